"""`vlmbuild demo`: synth the tiny InternVL2-1B → build → serve → one streamed request via `openai`."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console

from vlmbuild.hub import model_dir as hub_model_dir
from vlmbuild.pipeline import build_workdir
from vlmbuild.recipe import load_recipe
from vlmbuild.serve.runtime import ServeOptions
from vlmbuild.serve.server import BackgroundServer, make_app
from vlmbuild.synth import synth_checkpoint

DEMO_RECIPE = "tiny-internvl2-1b"
QUESTION = "<image>\nPlease describe the image shortly."


def demo_image(width: int = 800, height: int = 500) -> bytes:
    """A generated PNG (wide, so it tiles into several 448x448 patches)."""
    img = Image.new("RGB", (width, height), (30, 60, 120))
    draw = ImageDraw.Draw(img)
    draw.ellipse((80, 60, 380, 360), fill=(240, 200, 40))
    draw.rectangle((450, 150, 760, 440), fill=(200, 40, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def run_demo(workdir: Path | None = None, builder: str = "auto", console: Console | None = None) -> dict:
    console = console or Console()
    keep = workdir is not None
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vlmbuild-demo-"))
    try:
        recipe = load_recipe(DEMO_RECIPE)
        t0 = time.time()
        synth_checkpoint(recipe, hub_model_dir(workdir))
        console.print(f"[green]✓[/] synth   tiny random InternVL2-1B layout → {hub_model_dir(workdir)}")
        report = build_workdir(recipe, workdir, builder=builder)
        for step in report.steps:
            console.print(f"{'[green]✓' if step.status == 'built' else '[yellow]–'}[/] {step.name:<14} {step.status:<8} {step.detail}",
                          highlight=False, soft_wrap=True)
        t_build = time.time() - t0
        app = make_app(workdir, ServeOptions(device="cpu"))
        with BackgroundServer(app) as url:
            console.print(f"[green]✓[/] serving {url}/v1 (model {recipe.name})")
            result = _ask(url, recipe.name, console)
        result["build_seconds"] = t_build
        console.print(f"build {t_build:.1f}s · first token {result['ttft']:.2f}s · total {result['seconds']:.2f}s · "
                      f"{result['prompt_tokens']} prompt + {result['completion_tokens']} completion tokens", soft_wrap=True)
        return result
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _ask(url: str, model: str, console: Console) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="demo")
    data_url = "data:image/png;base64," + base64.b64encode(demo_image()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                             {"type": "text", "text": QUESTION}]}]
    start, ttft, text, usage = time.time(), None, [], None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    console.print("[bold]answer (random weights, so gibberish is expected):[/] ", end="")
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                ttft = ttft or time.time() - start
                text.append(choice.delta.content)
                console.print(choice.delta.content, end="", markup=False, highlight=False)
    console.print()
    return {"text": "".join(text), "ttft": ttft or 0.0, "seconds": time.time() - start,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
