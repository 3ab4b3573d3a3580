"""Tiny random-weight checkpoints in the exact original Hugging Face layout of a recipe's model.

`synth_checkpoint` picks the layout by the recipe's vision encoder (InternVL2 or Qwen-VL), the LLM
half by its family, and the size variant by its hub repo; the result is written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vlmbuild.errors import UnsupportedError
from vlmbuild.fsutil import atomic_dir
from vlmbuild.manifest import write_manifest
from vlmbuild.recipe import Recipe
from vlmbuild.synth.internvl import write_internvl
from vlmbuild.synth.qwen_vl import write_qwen_vl

# recipe.vision → writer of that checkpoint layout into an empty directory.
LAYOUTS: dict[str, Callable[[Recipe, Path, int], None]] = {"intern_vit": write_internvl, "qwen_vit": write_qwen_vl}


def synth_checkpoint(recipe: Recipe, output_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `recipe`'s layout to `output_dir` (replaced only on success)."""
    try:
        layout = LAYOUTS[recipe.vision]
    except KeyError:
        raise UnsupportedError(f"synth cannot make a '{recipe.vision}' checkpoint", hint=f"supported: {', '.join(sorted(LAYOUTS))}") from None
    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
        layout(recipe, tmp, seed)
        write_manifest(tmp, "hf-checkpoint", source="synth", recipe=recipe.name, seed=seed)
    return output_dir
