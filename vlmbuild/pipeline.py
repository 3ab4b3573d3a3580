"""`vlmbuild build`: convert + build-vit + build-llm into one work directory with a manifest.

Work directory layout (read by `serve` through `manifest.json`, never guessed from names):
    hf/                  the downloaded or synthesized HF checkpoint (unless --model-dir points elsewhere)
    trtllm_checkpoint/   config.json + rank{r}.safetensors   (torch backend runs this)
    vision/              vision.onnx (+ engine) + manifest.json
    llm_engine/          TRT-LLM engine, when tensorrt_llm is present
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import CheckpointError, ToolMissingError, UnsupportedError
from vlmbuild.hub import model_dir as hub_model_dir
from vlmbuild.llm.build import build_llm
from vlmbuild.llm.convert import convert_checkpoint
from vlmbuild.llm.family import family_for_architecture
from vlmbuild.manifest import read_manifest, write_manifest
from vlmbuild.recipe import Recipe
from vlmbuild.tokenizer import load_tokenizer

# Top-level HF architecture → (vision encoder key, default chat template when config.json names none).
MODEL_KINDS = {"InternVLChatModel": ("intern_vit", None), "QWenLMHeadModel": ("qwen_vit", "chatml")}
# Top-level HF architecture → the model name clients of the reference (grps-trtllm) guides send.
GUIDE_MODEL_NAMES = {"InternVLChatModel": "InternVL2", "QWenLMHeadModel": "Qwen-VL-Chat"}


@dataclass
class Step:
    name: str
    status: str  # "built" | "skipped"
    detail: str = ""


@dataclass
class BuildReport:
    workdir: Path
    steps: list[Step] = field(default_factory=list)


def recipe_for_checkpoint(model_dir: Path) -> Recipe:
    """A recipe with default build parameters for a checkpoint given only by directory."""
    ckpt = HfCheckpoint(model_dir)
    arch = (ckpt.config.architectures or ["?"])[0]
    if arch not in MODEL_KINDS:
        raise UnsupportedError(f"model architecture '{arch}' in {model_dir}/config.json is not supported",
                               hint=f"supported: {', '.join(MODEL_KINDS)}")
    vision, template = MODEL_KINDS[arch]
    family = family_for_architecture(ckpt.config.llm_architecture)
    # `W/hf` is named after its work directory; any other checkpoint directory after itself
    name = model_dir.resolve().parent.name if model_dir.name == "hf" else model_dir.name
    return Recipe(name=name, family=family.name, vision=vision,
                  template=ckpt.config.template or template or "", max_dynamic_patch=ckpt.config.max_dynamic_patch)


def build_workdir(recipe: Recipe | None, workdir: str | Path, model_dir: str | Path | None = None,
                  builder: str = "auto", dry_run_llm: bool = False) -> BuildReport:
    workdir = Path(workdir)
    model_dir = Path(model_dir) if model_dir else hub_model_dir(workdir)
    if not (model_dir / "config.json").is_file():
        hint = "run `vlmbuild download RECIPE --workdir W` (or `vlmbuild synth RECIPE --output-dir W/hf`) first"
        raise CheckpointError(f"no checkpoint in {model_dir}", hint=hint)
    recipe = recipe or recipe_for_checkpoint(model_dir)
    load_tokenizer(model_dir)  # serving needs it: fail before hours of building, not after
    report = BuildReport(workdir)

    ckpt_dir = workdir / "trtllm_checkpoint"
    res = convert_checkpoint(model_dir, ckpt_dir, dtype=recipe.dtype, tp_size=recipe.tp_size, pp_size=recipe.pp_size,
                             weight_only=recipe.weight_only, expect_family=recipe.family, show_progress=True)
    report.steps.append(Step("convert", "built", f"{res.family} → {ckpt_dir} ({res.config.dtype}, tp {recipe.tp_size}, pp {recipe.pp_size})"))

    from vlmbuild.vision.pipeline import build_vit  # heavy imports (onnx) only when building

    vit = recipe.vit
    vres = build_vit(model_dir, workdir / "vision", dtype=vit.dtype, min_batch=vit.min_batch,
                     opt_batch=vit.opt_batch, max_batch=vit.max_batch, builder=builder)
    report.steps.append(Step("vision-onnx", "built", str(vres.onnx_path)))
    if vres.engine_path:
        report.steps.append(Step("vision-engine", "built", f"{vres.builder} → {vres.engine_path}"))
    else:
        report.steps.append(Step("vision-engine", "skipped", vres.skipped_reason or "builder none"))

    engine_dir = workdir / "llm_engine"
    try:
        lres = build_llm(ckpt_dir, engine_dir, recipe.llm, recipe.max_multimodal_len, dry_run=dry_run_llm)
        status = "built" if lres.built else "skipped"
        report.steps.append(Step("llm-engine", status, " ".join(lres.command) if not lres.built else str(engine_dir)))
    except ToolMissingError:
        report.steps.append(Step("llm-engine", "skipped", "tensorrt_llm is not installed; the torch backend serves the checkpoint"))

    write_manifest(workdir, "workdir", recipe=recipe.resolved(), model_dir=str(model_dir.resolve()),
                   llm_checkpoint="trtllm_checkpoint", vision="vision",
                   llm_engine="llm_engine" if (engine_dir / "manifest.json").is_file() else None,
                   steps=[asdict(s) for s in report.steps])
    return report


def read_workdir(workdir: str | Path) -> dict:
    """The workdir manifest's payload (recipe, model_dir, artifact paths, steps)."""
    return read_manifest(workdir, "workdir").data
