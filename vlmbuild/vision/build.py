"""Vision engine from the exported ONNX: TensorRT 10 (FP16/BF16 builder flags) or strongly typed
TensorRT-RTX / TensorRT ≥ 11 (the ONNX dtype decides). Recipe: docs/trtllm-facts.md §6."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from vlmbuild.errors import ConfigError, ExportError, ToolMissingError, UnsupportedError
from vlmbuild.fsutil import atomic_write_bytes
from vlmbuild.vision.export import INPUT

Builder = Literal["auto", "tensorrt", "tensorrt-rtx", "none"]
BUILDERS: tuple[str, ...] = ("auto", "tensorrt", "tensorrt-rtx", "none")
# Builder name → importable modules providing the TensorRT Python API, first found wins.
BUILDER_MODULES: dict[str, tuple[str, ...]] = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
_INSTALL_HINT = ("install `tensorrt` (NVIDIA GPU, TensorRT 10) or `tensorrt-rtx-cu12-bindings tensorrt-rtx-cu12-libs`,"
                 " or pass --builder none")
# Precision flags TensorRT 10 needs for a weakly typed network; strongly typed builders take the ONNX types.
_PRECISION_FLAGS = {"float16": ("FP16",), "bfloat16": ("BF16",), "float32": ()}


@dataclass(frozen=True)
class Profile:
    """Batch (tiles) range of the engine's one optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min}/{self.opt}/{self.max}")

    def shapes(self, image_size: int) -> tuple[tuple[int, ...], ...]:
        return tuple((b, 3, image_size, image_size) for b in (self.min, self.opt, self.max))


@dataclass(frozen=True)
class EngineBuild:
    builder: str
    """'tensorrt' or 'tensorrt-rtx'."""
    version: str
    strongly_typed: bool
    profile: Profile
    engine_path: Path
    seconds: float
    size_bytes: int


def resolve_builder(builder: str) -> tuple[str, ModuleType]:
    """(builder name, TensorRT module) for 'auto' / 'tensorrt' / 'tensorrt-rtx'; ToolMissingError if absent."""
    if builder not in BUILDER_MODULES and builder != "auto":
        raise UnsupportedError(f"unknown engine builder '{builder}'", hint=f"choose one of {', '.join(BUILDERS)}")
    names = tuple(BUILDER_MODULES) if builder == "auto" else (builder,)
    for name in names:
        for module in BUILDER_MODULES[name]:
            try:
                return name, importlib.import_module(module)
            except ImportError:
                continue
    tried = ", ".join(m for n in names for m in BUILDER_MODULES[n])
    raise ToolMissingError(f"no TensorRT Python module for builder '{builder}' (tried {tried})", hint=_INSTALL_HINT)


def strongly_typed(trt: ModuleType) -> bool:
    """TensorRT-RTX and TensorRT ≥ 11 dropped the precision flags: build strongly typed there."""
    return not hasattr(trt.BuilderFlag, "FP16")


def build_engine(onnx_path: str | Path, engine_path: str | Path, min_batch: int, opt_batch: int, max_batch: int,
                 dtype: str, builder: str = "auto", image_size: int = 448) -> EngineBuild | None:
    """Parse the ONNX, add one batch profile on 'input', build and write the engine atomically; None for 'none'."""
    if builder == "none":
        return None
    profile = Profile(min_batch, opt_batch, max_batch)
    name, trt = resolve_builder(builder)
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    trt_builder = trt.Builder(logger)
    typed = strongly_typed(trt)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = trt_builder.create_network(flags)
    _parse(trt, network, logger, Path(onnx_path))
    config = trt_builder.create_builder_config()
    for flag in () if typed else _PRECISION_FLAGS[dtype]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    trt_profile = trt_builder.create_optimization_profile()
    trt_profile.set_shape(INPUT, *profile.shapes(image_size))
    config.add_optimization_profile(trt_profile)
    serialized = trt_builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{name} could not build an engine from {onnx_path}", hint="the builder log above says why")
    data = bytes(serialized)
    atomic_write_bytes(engine_path, data)
    return EngineBuild(name, trt.__version__, typed, profile, Path(engine_path), time.perf_counter() - start, len(data))


def _parse(trt: ModuleType, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):  # by path, so external `.data` files resolve
        return
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    first = f"{errors[0].desc()} (node {errors[0].node()} {errors[0].node_operator()})" if errors else "no error reported"
    more = f"; {len(errors) - 1} more" if len(errors) > 1 else ""
    raise ExportError(f"ONNX parser rejected {onnx_path}: {first}{more}")
