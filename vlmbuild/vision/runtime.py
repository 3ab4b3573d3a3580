"""Run a built vision directory: TensorRT engine, onnxruntime over vision.onnx, or the torch module.

Every backend takes float32 pixels [N, 3, S, S] (any N: split into chunks of the profile's max batch)
and returns float32 features [N, tokens, hidden] on the CPU, ready for the LLM backend's prompt table.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import CheckpointError, ConfigError, ExportError, ToolMissingError, UnsupportedError
from vlmbuild.manifest import read_manifest
from vlmbuild.vision.build import BUILDER_MODULES, resolve_builder
from vlmbuild.vision.encoder import DTYPES, get_encoder
from vlmbuild.vision.export import INPUT, OUTPUT, OrtGraph

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
# TensorRT DataType member name → torch dtype of the engine's I/O tensors.
_TRT_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class VisionSpec:
    """The vision manifest, typed: what the runtimes need."""

    directory: Path
    encoder: str
    dtype: str
    image_size: int
    tokens: int
    hidden_size: int
    max_batch: int
    onnx: Path
    engine: Path | None
    builder: str | None
    model_dir: Path | None

    @classmethod
    def read(cls, vision_dir: str | Path) -> "VisionSpec":
        d = Path(vision_dir)
        data = read_manifest(d, "vision").data
        try:
            return cls(d, data["encoder"], data["dtype"], data["image_size"], data["output_shape"][1], data["hidden_size"],
                       data["profile"]["max"], d / data["onnx"], d / data["engine"] if data["engine"] else None,
                       (data["builder"] or {}).get("name"), Path(data["model_dir"]) if data.get("model_dir") else None)
        except (KeyError, IndexError, TypeError) as err:
            raise CheckpointError(f"{d}/manifest.json lacks vision field {err}", hint="rebuild it with vlmbuild build-vit") from None


def check_pixels(shape: tuple[int, ...], image_size: int) -> None:
    if len(shape) != 4 or tuple(shape[1:]) != (3, image_size, image_size):
        raise UnsupportedError(f"expected pixel_values [N, 3, {image_size}, {image_size}], got {list(shape)}")


def torch_dtype(trt_dtype) -> torch.dtype:
    """torch dtype of a TensorRT `DataType` (by member name, so any TensorRT flavour works)."""
    try:
        return _TRT_DTYPES[trt_dtype.name]
    except KeyError:
        raise UnsupportedError(f"vision engine tensor type {trt_dtype.name} is not supported, "
                               f"expected one of {', '.join(_TRT_DTYPES)}") from None


def choose_backend(requested: str, has_engine: bool, trt_importable: bool, cuda: bool,
                   ort_cuda: bool = False) -> tuple[str, str]:
    """(backend, reason). 'auto' takes the engine only where it can run; otherwise on a CUDA device
    onnxruntime only with its CUDA provider, else the torch module on the GPU; on the CPU onnxruntime."""
    if requested not in BACKENDS:
        raise ConfigError(f"unknown vision backend '{requested}'", hint=f"choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested, "requested"
    if has_engine and trt_importable and cuda:
        return "tensorrt", "engine, TensorRT runtime and CUDA present"
    why = "no engine was built" if not has_engine else (
        "the engine's TensorRT runtime is not installed" if not trt_importable else "no CUDA device")
    if cuda and not ort_cuda:
        return "torch", f"{why}; onnxruntime has no CUDA provider here"
    return "onnxruntime", why


class VisionRuntime:
    """Shape check + chunking over `max_batch`; subclasses run one chunk."""

    backend = ""

    def __init__(self, spec: VisionSpec, device: str):
        self.spec, self.device = spec, device
        self.max_batch, self.hidden_size, self.tokens = spec.max_batch, spec.hidden_size, spec.tokens

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixels(tuple(pixel_values.shape), self.spec.image_size)
        if pixel_values.shape[0] == 0:
            return torch.empty(0, self.tokens, self.hidden_size)
        pixels = pixel_values.float()
        return torch.cat([self._run(chunk) for chunk in pixels.split(self.max_batch)])

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OnnxRuntimeVision(VisionRuntime):
    backend = "onnxruntime"

    def __init__(self, spec: VisionSpec, device: str):
        super().__init__(spec, device)
        self.graph = OrtGraph(spec.onnx, device)

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.graph(pixels)


class TorchVision(VisionRuntime):
    """The encoder module itself: manifest dtype on CUDA, float32 on CPU (CPU half-precision kernels are slow or missing)."""

    backend = "torch"

    def __init__(self, spec: VisionSpec, device: str, model_dir: Path | None):
        super().__init__(spec, device)
        model_dir = model_dir or spec.model_dir
        if model_dir is None:
            raise CheckpointError(f"{spec.directory}/manifest.json names no model_dir", hint="pass model_dir for the torch backend")
        self.dtype = DTYPES[spec.dtype] if device == "cuda" else torch.float32
        self.module = get_encoder(spec.encoder).build(HfCheckpoint(model_dir), self.dtype).to(device)

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(pixels.to(self.device, self.dtype)).float().cpu()


class TensorRtVision(VisionRuntime):
    """Deserialize the engine and run it on torch CUDA tensors (the TensorRT 10 tensor-address API)."""

    backend = "tensorrt"

    def __init__(self, spec: VisionSpec, device: str):
        super().__init__(spec, device)
        if spec.engine is None:
            raise CheckpointError(f"{spec.directory} has no vision engine", hint="build it with --builder, or use the onnxruntime backend")
        _, trt = resolve_builder(spec.builder or "auto")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(spec.engine.read_bytes())
        if self._engine is None:
            raise ExportError(f"cannot deserialize {spec.engine}",
                              hint="rebuild it with this TensorRT on this GPU, or use --vision-backend onnxruntime")
        self._context = self._engine.create_execution_context()
        self._in, self._out = (torch_dtype(self._engine.get_tensor_dtype(n)) for n in (INPUT, OUTPUT))
        self._stream = torch.cuda.Stream()

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to("cuda", self._in).contiguous()
        self._context.set_input_shape(INPUT, tuple(x.shape))
        out = torch.empty(tuple(self._context.get_tensor_shape(OUTPUT)), dtype=self._out, device="cuda")
        self._context.set_tensor_address(INPUT, x.data_ptr())
        self._context.set_tensor_address(OUTPUT, out.data_ptr())
        self._stream.wait_stream(torch.cuda.current_stream())  # x was written on the default stream
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise ExportError(f"TensorRT failed to run {self.spec.engine} on a batch of {x.shape[0]}")
        self._stream.synchronize()
        return out.float().cpu()


def load_vision_runtime(vision_dir: str | Path, backend: str = "auto", device: str = "cpu",
                        model_dir: str | Path | None = None) -> VisionRuntime:
    """The vision runtime for a `build-vit` output directory; 'auto' logs which backend it took and why."""
    spec = VisionSpec.read(vision_dir)
    if device == "cuda" and not torch.cuda.is_available():
        raise ToolMissingError("device cuda was asked for but torch sees no CUDA device", hint="use --device cpu")
    # An engine runs only under the TensorRT flavour that built it; TensorRT-RTX engines only on RTX
    # GPUs, so `auto` leaves them to an explicit --vision-backend tensorrt.
    trt_importable = spec.builder != "tensorrt-rtx" and any(
        importlib.util.find_spec(m) for m in BUILDER_MODULES.get(spec.builder or "", ()))
    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    chosen, reason = choose_backend(backend, spec.engine is not None, trt_importable, device == "cuda", ort_cuda)
    log.info("vision backend: %s (%s)", chosen, reason)
    if chosen == "tensorrt":
        return TensorRtVision(spec, "cuda")
    if chosen == "torch":
        return TorchVision(spec, device, Path(model_dir) if model_dir else None)
    return OnnxRuntimeVision(spec, device)
