"""ONNX export of a vision encoder (dynamic batch, opset 17) and its numeric check with onnxruntime.

What `check_onnx` runs:
- float32 / float16 graphs: the exported graph itself, on fresh random pixels, against the encoder
  module in float32 (so the float16 error is the whole error a user sees).
- bfloat16 graphs: onnxruntime has no bfloat16 Conv/MatMul kernels, so the exported graph runs with its
  bf16 weights widened to fp32 and its casts to bf16 turned into fp32 (`upcast_bfloat16`; widening is
  exact), against the module holding the same bf16-rounded weights in fp32, at the fp32 tolerance.
  This proves the export (every node, every weight); bf16 rounding of activations is not measured
  here, it is the engine builder's part.
"""

from __future__ import annotations

import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import ExportError
from vlmbuild.vision.encoder import DTYPES, Encoder

INPUT, OUTPUT = "input", "output"
OPSET = 17
# Protobuf cannot serialise a message past 2 GiB; keep a margin for the graph itself.
_PROTO_LIMIT = 2**31 - 2**27
_ORT_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class OnnxExport:
    onnx: Path
    data: Path | None
    """The single external-data file next to the graph, or None when the weights are inside it."""
    dtype: str
    input_shape: list[int | str]
    """As the graph declares it: ['batch', 3, 448, 448]."""
    output_shape: list[int | str]
    """['batch', tokens, hidden]."""
    seconds: float


@dataclass(frozen=True)
class CheckReport:
    graph: str
    """What ran: 'exported', or 'bf16 weights, fp32 upcast' for bfloat16 graphs (see module doc)."""
    dtype: str
    batch_sizes: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    """max |onnx − torch| / max |torch| over all checked batches."""
    tolerance: float
    seed: int

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance


def export_onnx(ckpt: HfCheckpoint, encoder: Encoder, out_path: str | Path, dtype: str, opt_batch: int,
                external_data: bool | None = None) -> OnnxExport:
    """Export `encoder` built from `ckpt` in `dtype` to `out_path` with a dynamic batch axis.

    `external_data` None decides by size: graphs whose weights pass the protobuf limit keep them in
    one `<name>.data` file next to the `.onnx` (True / False force either layout).
    """
    module = encoder.build(ckpt, DTYPES[dtype])
    return export_module(module, encoder.image_size, Path(out_path), dtype, opt_batch, external_data)


def export_module(module: torch.nn.Module, image_size: int, out_path: Path, dtype: str, opt_batch: int,
                  external_data: bool | None = None) -> OnnxExport:
    import onnx

    start = time.perf_counter()
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > _PROTO_LIMIT if external_data is None else external_data
    sample = torch.randn(opt_batch, 3, image_size, image_size, dtype=DTYPES[dtype])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = out_path.with_name(out_path.name + ".data")
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_path.parent) as tmp:
        raw = Path(tmp) / "graph.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is the exporter TensorRT recipes use
                torch.onnx.export(module, (sample,), str(raw), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                                  output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        except Exception as err:  # the exporter raises many types; keep one line
            raise ExportError(f"torch.onnx.export failed: {str(err).splitlines()[0]}") from err
        # For > 2 GiB graphs torch writes one file per initializer beside graph.onnx; onnx.load reads them all
        # back so that save_model can gather them into a single `.data` file.
        model = onnx.load(str(raw))
        _declare_output(model.graph.output[0], module.out_tokens, module.out_hidden)
        data_path.unlink(missing_ok=True)  # save_model appends to an existing data file
        onnx.save_model(model, str(out_path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
    onnx.checker.check_model(str(out_path))  # by path: works past 2 GiB
    graph = onnx.load(str(out_path), load_external_data=False).graph
    return OnnxExport(out_path, data_path if external else None, dtype, _shape(graph.input[0]), _shape(graph.output[0]),
                      time.perf_counter() - start)


def _declare_output(value_info, tokens: int, hidden: int) -> None:
    """Write the static [batch, tokens, hidden] into the graph output; the exporter leaves dim 1 symbolic."""
    dims = value_info.type.tensor_type.shape.dim
    for dim, size in zip(dims[1:], (tokens, hidden)):
        dim.dim_value = size


def _shape(value_info) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_onnx(ckpt: HfCheckpoint, encoder: Encoder, onnx_path: str | Path, dtype: str, seed: int | None = None,
               batch_sizes: tuple[int, ...] = (1, 3), device: str = "cpu") -> CheckReport:
    """Run the ONNX graph on fresh random pixels and compare with the torch module; raise ExportError past tolerance."""
    seed = random.randrange(2**31) if seed is None else seed
    graph = OrtGraph(Path(onnx_path), device)
    if graph.upcast:  # same bf16-rounded weights on both sides, fp32 arithmetic (module doc)
        module, tol, label = encoder.build(ckpt, torch.bfloat16).float(), encoder.tolerance_for("float32"), "bf16 weights, fp32 upcast"
    else:
        module, tol, label = encoder.build(ckpt, torch.float32), encoder.tolerance_for(dtype), "exported"
    module = module.to(device)
    gen = torch.Generator().manual_seed(seed)
    abs_err = ref_max = 0.0
    for n in batch_sizes:
        pixels = torch.randn(n, 3, encoder.image_size, encoder.image_size, generator=gen)
        got = graph(pixels)
        with torch.no_grad():
            want = module(pixels.to(device)).float().cpu()
        abs_err = max(abs_err, (got - want).abs().max().item())
        ref_max = max(ref_max, want.abs().max().item())
    report = CheckReport(label, dtype, tuple(batch_sizes), abs_err, abs_err / max(ref_max, 1e-12), tol, seed)
    if not report.passed:
        raise ExportError(
            f"ONNX check failed: max relative error {report.max_rel_error:.2e} > tolerance {report.tolerance:.0e} "
            f"({dtype}, {label}, batches {report.batch_sizes}, seed {seed})",
            hint="re-run with VLMBUILD_DEBUG=1 and report it",
        )
    return report


class OrtGraph:
    """An onnxruntime session over a vision graph: float32 pixels in, float32 features out.

    bfloat16 graphs run as their fp32 upcast (`upcast_bfloat16`): onnxruntime has no bf16 Conv/MatMul kernels.
    The CUDA execution provider is used when `device` is cuda and it is installed.
    """

    def __init__(self, onnx_path: Path, device: str = "cpu"):
        import onnx
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        header = onnx.load(str(onnx_path), load_external_data=False)
        self.upcast = header.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
        try:
            if not self.upcast:
                self.session = ort.InferenceSession(str(onnx_path), providers=providers)
            else:
                # Through a file, so graphs past 2 GiB work; onnxruntime has read the weights once the session exists.
                with tempfile.TemporaryDirectory(prefix="vlmbuild-upcast-") as tmp:
                    path = Path(tmp) / "upcast.onnx"
                    onnx.save_model(upcast_bfloat16(onnx.load(str(onnx_path))), str(path), save_as_external_data=True,
                                    all_tensors_to_one_file=True, location="upcast.onnx.data")
                    self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {onnx_path}: {str(err).splitlines()[0]}") from err
        self.providers = self.session.get_providers()
        self.input_type = _ORT_INPUT_TYPES[self.session.get_inputs()[0].type]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {INPUT: pixels.detach().cpu().numpy().astype(self.input_type)})
        return torch.from_numpy(out).float()


def upcast_bfloat16(model):
    """The same graph in float32: bf16 weights/constants widened (exactly), Casts to bf16 and bf16 I/O made fp32.

    Covers what our exported encoders contain (no subgraphs). Modifies and returns `model`.
    """
    from onnx import TensorProto, numpy_helper

    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT

    def widen(t) -> None:
        if t.data_type == bf16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    g = model.graph
    for init in g.initializer:
        widen(init)
    for node in g.node:
        for attr in node.attribute:
            if attr.name == "to" and node.op_type == "Cast" and attr.i == bf16:
                attr.i = f32
            elif attr.HasField("t"):  # Constant / ConstantOfShape values
                widen(attr.t)
    for info in [*g.input, *g.output, *g.value_info]:
        if info.type.tensor_type.elem_type == bf16:
            info.type.tensor_type.elem_type = f32
    return model
