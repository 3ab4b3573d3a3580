"""The `vlmbuild` command line: parses options and calls one library function per command.

All VlmbuildErrors end here as one line on stderr (traceback only with VLMBUILD_DEBUG=1)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from vlmbuild.errors import ConfigError, VlmbuildError
from vlmbuild.recipe import Dtype, Recipe, WeightOnly, load_recipe, recipe_names

app = typer.Typer(help="Build TensorRT(-LLM) engines for InternVL2 / Qwen-VL-Chat and serve them.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
recipes_app = typer.Typer(help="List recipes, or show one resolved.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")
out = Console()
err = Console(stderr=True)

DEFAULT_WORKDIR = Path("work")

# Shared options, defined once; seed-style underscore spellings are accepted as aliases.
RecipeArg = Annotated[Optional[str], typer.Argument(help="Recipe name (see `vlmbuild recipes`) or path to a YAML.")]
ModelDir = Annotated[Optional[Path], typer.Option("--model-dir", "--model_dir", help="HF checkpoint directory.")]
OutputDir = Annotated[Path, typer.Option("--output-dir", "--output_dir", "-o", help="Where to write the artifact.")]
WorkDir = Annotated[Path, typer.Option("--workdir", help="Work directory holding hf/, trtllm_checkpoint/, vision/, llm_engine/.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="bfloat16 | float16 | float32 (default: the recipe's).")]


def _recipe(name: str | None) -> Recipe | None:
    return load_recipe(name) if name else None


def _model_dir(recipe: Recipe | None, model_dir: Path | None, workdir: Path | None = None) -> Path:
    from vlmbuild.hub import model_dir as hub_model_dir

    if model_dir:
        return model_dir
    if recipe:  # where `vlmbuild download RECIPE [--workdir W]` put it (W defaults to ./work)
        return hub_model_dir(workdir or DEFAULT_WORKDIR)
    raise ConfigError("give --model-dir M, or a RECIPE (its checkpoint is read from WORKDIR/hf, --workdir defaulting to ./work)")


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in Dtype.__args__:
        raise ConfigError(f"--dtype '{dtype}' is not one of {', '.join(Dtype.__args__)}")


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List the recipes."""
    if ctx.invoked_subcommand:
        return
    table = Table("recipe", "hf repo", "llm", "vision", "description")
    for name in recipe_names():
        r = load_recipe(name)
        table.add_row(name, r.hf_repo or "(synthetic)", r.family, r.vision, r.description)
    out.print(table)


@recipes_app.command("show")
def recipes_show(name: str) -> None:
    """Print one recipe resolved, derived values included."""
    out.print(yaml.safe_dump(load_recipe(name).resolved(), sort_keys=False, allow_unicode=True), end="")


@app.command()
def synth(recipe: Annotated[str, typer.Argument()], output_dir: OutputDir, seed: int = 0) -> None:
    """Write a tiny random-weight checkpoint in the exact original HF layout of RECIPE's model."""
    from vlmbuild.synth import synth_checkpoint

    path = synth_checkpoint(load_recipe(recipe), output_dir, seed=seed)
    out.print(f"[green]✓[/] tiny {recipe} checkpoint written to {path}")


@app.command()
def download(recipe: Annotated[str, typer.Argument()], workdir: WorkDir = DEFAULT_WORKDIR,
             revision: Annotated[Optional[str], typer.Option()] = None,
             source: Annotated[str, typer.Option(help="huggingface | modelscope")] = "huggingface") -> None:
    """Fetch RECIPE's checkpoint into WORKDIR/hf (HF_ENDPOINT, HF_TOKEN honoured) and apply known fixes."""
    from vlmbuild.hub import download as hub_download

    path = hub_download(load_recipe(recipe), workdir, revision=revision, source=source)
    out.print(f"[green]✓[/] {recipe} downloaded to {path}")


@app.command()
def convert(recipe: RecipeArg = None, model_dir: ModelDir = None, output_dir: OutputDir = Path("trtllm_checkpoint"),
            workdir: Annotated[Optional[Path], typer.Option("--workdir")] = None, dtype: DtypeOpt = None,
            tp_size: Annotated[Optional[int], typer.Option("--tp-size", "--tp_size", min=1)] = None,
            pp_size: Annotated[Optional[int], typer.Option("--pp-size", "--pp_size", min=1)] = None,
            weight_only: Annotated[Optional[str], typer.Option("--weight-only", help="int8 | int4")] = None) -> None:
    """Convert the LLM of a checkpoint into a TensorRT-LLM checkpoint (config.json + rank{N}.safetensors)."""
    from vlmbuild.llm.convert import convert_checkpoint

    r = _recipe(recipe)
    _check_dtype(dtype)
    if weight_only is not None and weight_only not in WeightOnly.__args__:
        raise ConfigError(f"--weight-only '{weight_only}' is not int8 or int4")
    res = convert_checkpoint(
        _model_dir(r, model_dir, workdir), output_dir, dtype=dtype or (r.dtype if r else "bfloat16"),
        tp_size=tp_size or (r.tp_size if r else 1), pp_size=pp_size or (r.pp_size if r else 1),
        weight_only=weight_only or (r.weight_only if r else None), expect_family=r.family if r else None, show_progress=True)
    skipped = ", ".join(f"{p}* ({n})" for p, n in res.skipped.items()) or "nothing"
    out.print(f"[green]✓[/] {res.family} → {res.output_dir}: {res.config.dtype}, "
              f"{res.config.world_size} rank(s), {res.tensors_read} tensors read, skipped {skipped}, {res.seconds:.1f}s",
              soft_wrap=True)


@app.command("build-llm")
def build_llm_cmd(checkpoint_dir: Annotated[Path, typer.Option("--checkpoint-dir", "--checkpoint_dir")],
                  output_dir: OutputDir = Path("llm_engine"),
                  recipe: Annotated[Optional[str], typer.Option("--recipe")] = None,
                  max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", "--max_batch_size", "--maxBS")] = None,
                  max_input_len: Annotated[Optional[int], typer.Option("--max-input-len", "--max_input_len")] = None,
                  max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", "--max_seq_len")] = None,
                  dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the trtllm-build command only.")] = False) -> None:
    """Build the TensorRT-LLM engine with trtllm-build from the recipe's parameters."""
    from vlmbuild.llm.build import build_llm

    r = load_recipe(recipe) if recipe else Recipe(name="default", family="?", vision="?", template="")
    overrides = {k: v for k, v in {"max_batch_size": max_batch_size, "max_input_len": max_input_len,
                                   "max_seq_len": max_seq_len}.items() if v is not None}
    if overrides:
        r = Recipe.model_validate({**r.model_dump(), "llm": {**r.llm.model_dump(), **overrides}})
    res = build_llm(checkpoint_dir, output_dir, r.llm, r.max_multimodal_len, dry_run=dry_run)
    if dry_run:
        out.print(shlex.join(res.command), soft_wrap=True, highlight=False)
    else:
        out.print(f"[green]✓[/] engine built in {res.output_dir} ({res.seconds:.0f}s)")


@app.command("build-vit")
def build_vit_cmd(recipe: RecipeArg = None, model_dir: ModelDir = None, output_dir: OutputDir = Path("vision"),
                  workdir: Annotated[Optional[Path], typer.Option("--workdir")] = None, dtype: DtypeOpt = None,
                  min_batch: Annotated[Optional[int], typer.Option("--min-batch", "--minBS", min=1)] = None,
                  opt_batch: Annotated[Optional[int], typer.Option("--opt-batch", "--optBS", min=1)] = None,
                  max_batch: Annotated[Optional[int], typer.Option("--max-batch", "--maxBS", min=1)] = None,
                  builder: Annotated[str, typer.Option(help="auto | tensorrt | tensorrt-rtx | none")] = "auto") -> None:
    """Export the vision encoder (+ projector) to ONNX with a dynamic batch axis and build its engine."""
    from vlmbuild.vision.pipeline import build_vit

    r = _recipe(recipe)
    _check_dtype(dtype)
    vit = r.vit if r else Recipe(name="d", family="?", vision="?", template="").vit
    res = build_vit(_model_dir(r, model_dir, workdir), output_dir, dtype=dtype or vit.dtype,
                    min_batch=min_batch or vit.min_batch, opt_batch=opt_batch or vit.opt_batch,
                    max_batch=max_batch or vit.max_batch, builder=builder)
    engine = f"engine {res.engine_path} ({res.builder})" if res.engine_path else f"no engine ({res.skipped_reason})"
    out.print(f"[green]✓[/] {res.onnx_path}, {engine}")


@app.command()
def build(recipe: RecipeArg = None, workdir: WorkDir = DEFAULT_WORKDIR, model_dir: ModelDir = None,
          builder: Annotated[str, typer.Option(help="vision engine builder: auto | tensorrt | tensorrt-rtx | none")] = "auto") -> None:
    """convert + build-vit + build-llm into WORKDIR, saying which engine steps ran and which were skipped."""
    from vlmbuild.pipeline import build_workdir

    report = build_workdir(_recipe(recipe), workdir, model_dir=model_dir, builder=builder)
    for step in report.steps:
        mark = "[green]✓[/]" if step.status == "built" else "[yellow]–[/]"
        out.print(f"{mark} {step.name:<14} {step.status:<8} {step.detail}", highlight=False, soft_wrap=True)
    out.print(f"work directory ready: {report.workdir}  (serve it: vlmbuild serve --workdir {report.workdir})")


@app.command()
def serve(recipe: RecipeArg = None, workdir: Annotated[Optional[Path], typer.Option("--workdir")] = None,
          host: str = "127.0.0.1", port: int = 9997,
          llm_backend: Annotated[str, typer.Option("--llm-backend", help="auto | trtllm | torch")] = "auto",
          vision_backend: Annotated[str, typer.Option("--vision-backend", help="auto | tensorrt | onnxruntime | torch")] = "auto",
          device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
          allowed_local_media_path: Annotated[Optional[Path], typer.Option("--allowed-local-media-path")] = None,
          served_model_name: Annotated[Optional[str], typer.Option("--served-model-name")] = None,
          api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="VLMBUILD_API_KEY")] = None) -> None:
    """Serve a built work directory behind an OpenAI-compatible /v1/chat/completions."""
    from vlmbuild.serve.runtime import DEVICES, LLM_BACKENDS, ServeOptions
    from vlmbuild.serve.server import serve as run_server
    from vlmbuild.vision.runtime import BACKENDS

    for name, value, allowed in (("--llm-backend", llm_backend, LLM_BACKENDS), ("--vision-backend", vision_backend, BACKENDS),
                                 ("--device", device, DEVICES)):
        if value not in allowed:
            raise ConfigError(f"{name} '{value}' is not one of {', '.join(allowed)}")
    if workdir is None:
        if recipe is None:
            raise ConfigError("give --workdir W (or a RECIPE whose work directory is ./work)")
        workdir = DEFAULT_WORKDIR
    options = ServeOptions(llm_backend=llm_backend, vision_backend=vision_backend, device=device,
                           allowed_local_media_path=allowed_local_media_path.resolve() if allowed_local_media_path else None,
                           served_model_name=served_model_name)
    run_server(workdir, host, port, options, api_key=api_key)


@app.command()
def demo(workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Keep the artifacts here (default: a temp dir).")] = None,
         builder: Annotated[str, typer.Option(help="vision engine builder: auto | tensorrt | tensorrt-rtx | none")] = "auto") -> None:
    """synth the tiny InternVL2-1B → build → serve on a free port → one streamed request with the openai SDK."""
    from vlmbuild.demo import run_demo

    run_demo(workdir, builder=builder, console=out)


def main() -> None:
    """Entry point with the error boundary."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    try:
        rv = app(standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except VlmbuildError as e:
        if os.environ.get("VLMBUILD_DEBUG") == "1":
            raise
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click usage errors (click or typer's vendored copy)
            e.show()
            sys.exit(e.exit_code)
        raise
