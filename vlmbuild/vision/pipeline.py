"""`vlmbuild build-vit`: checkpoint → vision.onnx (checked) → engine → manifest.json, all or nothing."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import ExportError, ToolMissingError
from vlmbuild.fsutil import atomic_dir
from vlmbuild.manifest import write_manifest
from vlmbuild.vision.build import EngineBuild, Profile, build_engine, resolve_builder
from vlmbuild.vision.encoder import encoder_for
from vlmbuild.vision.export import INPUT, OUTPUT, CheckReport, check_onnx, export_onnx

console = Console(stderr=True)

ONNX_FILE = "vision.onnx"
ENGINE_FILE = "vision.engine"
MANIFEST_KIND = "vision"


@dataclass(frozen=True)
class VisionBuildResult:
    output_dir: Path
    encoder: str
    onnx_path: Path
    engine_path: Path | None
    builder: str | None
    """'tensorrt' / 'tensorrt-rtx' when an engine was built."""
    skipped_reason: str | None
    """Why no engine was built ('builder none', or the missing tool under 'auto')."""
    check: CheckReport
    output_shape: list[int | str]


def build_vit(model_dir: str | Path, output_dir: str | Path, dtype: str = "bfloat16", min_batch: int = 1,
              opt_batch: int = 13, max_batch: int = 26, builder: str = "auto", device: str = "cpu") -> VisionBuildResult:
    """Export the checkpoint's vision encoder + projector, check it, build its engine; nothing is left on failure.

    `builder='auto'` skips the engine (saying why) when no TensorRT module is installed; naming a
    builder makes its absence an error. `device` is where the numeric check runs the torch module.
    """
    profile = Profile(min_batch, opt_batch, max_batch)  # fail before any work
    ckpt = HfCheckpoint(model_dir)
    encoder = encoder_for(ckpt)
    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
        with console.status(f"exporting {encoder.name} to ONNX ({dtype})…"):
            exported = export_onnx(ckpt, encoder, tmp / ONNX_FILE, dtype, opt_batch)
        with console.status("checking the ONNX graph with onnxruntime…"):
            check = _checked(ckpt, encoder, exported.onnx, dtype, device)
        engine, skipped = _engine(tmp / ONNX_FILE, tmp / ENGINE_FILE, min_batch, opt_batch, max_batch, dtype, builder, encoder.image_size)
        write_manifest(
            tmp, MANIFEST_KIND, encoder=encoder.name, model_dir=str(ckpt.path.resolve()), dtype=dtype,
            image_size=encoder.image_size, mean=list(encoder.mean), std=list(encoder.std), tokens_per_patch=encoder.tokens_per_patch,
            hidden_size=exported.output_shape[-1], input_name=INPUT, output_name=OUTPUT,
            input_shape=exported.input_shape, output_shape=exported.output_shape,
            profile=asdict(profile), onnx=ONNX_FILE,
            onnx_data=exported.data.name if exported.data else None, engine=ENGINE_FILE if engine else None,
            builder=_builder_record(engine), engine_skipped=skipped, check=asdict(check),
        )
    return VisionBuildResult(output_dir, encoder.name, output_dir / ONNX_FILE, output_dir / ENGINE_FILE if engine else None,
                             engine.builder if engine else None, skipped, check, exported.output_shape)


def _checked(ckpt: HfCheckpoint, encoder, onnx_path: Path, dtype: str, device: str) -> CheckReport:
    try:
        check = check_onnx(ckpt, encoder, onnx_path, dtype, device=device)
    except ExportError as err:
        console.print(f"[red]✗[/] ONNX check: {err}", highlight=False, soft_wrap=True)
        raise
    console.print(f"[green]✓[/] ONNX check ({check.graph}, {dtype}, batches {check.batch_sizes}): "
                  f"max abs error {check.max_abs_error:.2e}, max rel error {check.max_rel_error:.2e} ≤ {check.tolerance:.0e}",
                  highlight=False, soft_wrap=True)
    return check


def _engine(onnx_path: Path, engine_path: Path, min_batch: int, opt_batch: int, max_batch: int, dtype: str,
            builder: str, image_size: int) -> tuple[EngineBuild | None, str | None]:
    if builder == "none":
        return None, "builder none"
    if builder == "auto":
        try:
            resolve_builder("auto")
        except ToolMissingError as err:
            console.print(f"[yellow]–[/] vision engine skipped: {err}", highlight=False, soft_wrap=True)
            return None, str(err)
    with console.status(f"building the vision engine (batch {min_batch}/{opt_batch}/{max_batch})…"):
        engine = build_engine(onnx_path, engine_path, min_batch, opt_batch, max_batch, dtype, builder, image_size)
    console.print(f"[green]✓[/] {engine.builder} {engine.version} engine: {engine.size_bytes / 2**20:.1f} MiB in {engine.seconds:.0f}s",
                  highlight=False, soft_wrap=True)
    return engine, None


def _builder_record(engine: EngineBuild | None) -> dict | None:
    if engine is None:
        return None
    return {"name": engine.builder, "version": engine.version, "strongly_typed": engine.strongly_typed,
            "seconds": round(engine.seconds, 2), "size_bytes": engine.size_bytes}
