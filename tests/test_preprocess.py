"""Tiling and normalization vs transformers' `GotOcr2ImageProcessorPil` (independent reference: same
grid search and tie rule, PIL BICUBIC, thumbnail appended last), on fresh random images.

Tolerance: 1e-5 absolute on normalized pixels (both resize with PIL on uint8, so tiles are
bit-identical; only the float rescale/normalize order differs, float64 vs float32)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlmbuild.errors import UnsupportedError
from vlmbuild.serve.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSORS,
    closest_grid,
    preprocessor_for,
)
from vlmbuild.vision.encoder import ENCODERS

try:  # transformers 5.x keeps the PIL backend here; older releases had only the slow processor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil as Reference
except ImportError:  # pragma: no cover - depends on the installed transformers
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor as Reference

SEED = random.randrange(2**32)
ATOL = 1e-5
# (width, height): exact ratio ties ((1,1)/(2,2)/(3,3), (2,1)/(4,2)) on both sides of the area rule,
# tiny, very wide/tall, and random sizes.
TIE_SIZES = [(448, 448), (449, 449), (634, 634), (900, 900), (1000, 1000), (896, 448), (1200, 600), (1300, 650), (448, 896)]
ODD_SIZES = [(1, 1), (3, 7), (17, 5), (4000, 90), (60, 3000), (1344, 448)]


def random_sizes(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randint(20, 2500), rng.randint(20, 2500)) for _ in range(n)]


def random_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def reference(image: Image.Image, max_patches: int, mean, std, crop: bool = True) -> torch.Tensor:
    proc = Reference(crop_to_patches=crop, min_patches=1, max_patches=max_patches, size={"height": 448, "width": 448}, image_mean=mean, image_std=std)
    out = proc(images=[image], return_tensors="np")
    assert list(out["num_patches"]) == [len(out["pixel_values"])]
    return torch.from_numpy(np.asarray(out["pixel_values"], dtype=np.float32))


def test_internvl_tiles_match_gotocr2_reference():
    rng = random.Random(SEED)
    np_rng = np.random.default_rng(SEED)
    pre = preprocessor_for("intern_vit")
    for size in TIE_SIZES + ODD_SIZES + random_sizes(rng, 6):
        image = random_image(np_rng, size)
        got = pre(image)
        ref = reference(image, 12, IMAGENET_MEAN, IMAGENET_STD)
        assert got.shape == ref.shape, f"seed {SEED} size {size}: {tuple(got.shape)} vs {tuple(ref.shape)}"
        assert got.dtype == torch.float32 and got.shape[1:] == (3, 448, 448)
        err = (got - ref).abs().max().item()
        assert err <= ATOL, f"seed {SEED} size {size}: max |diff| {err}"
        assert got.shape[0] == pre.num_tiles(*size), f"seed {SEED} size {size}"


def test_tie_rule_and_tile_counts():
    # Square: (1,1),(2,2),(3,3) tie exactly; the larger grid wins while area > 0.5·448²·i·j.
    assert closest_grid(448, 448, 1, 12, 448) == (1, 1)
    assert closest_grid(634, 634, 1, 12, 448) == (2, 2)  # 401956 > 401408
    assert closest_grid(633, 633, 1, 12, 448) == (1, 1)  # 400689 < 401408
    assert closest_grid(1000, 1000, 1, 12, 448) == (3, 3)
    assert closest_grid(4000, 90, 1, 12, 448) == (12, 1)
    assert closest_grid(60, 3000, 1, 12, 448) == (1, 12)
    pre = preprocessor_for("intern_vit")
    assert pre.num_tiles(448, 448) == 1 and pre.num_tiles(1000, 1000) == 10 and pre.num_tiles(4000, 90) == 13


def test_thumbnail_is_last_and_tiles_are_row_major():
    """A 2x1-grid image whose halves are flat colours: tile 0 = left colour, 1 = right, 2 = thumbnail."""
    left, right = (200, 10, 10), (10, 10, 200)
    arr = np.zeros((448, 896, 3), dtype=np.uint8)
    arr[:, :448], arr[:, 448:] = left, right
    tiles = preprocessor_for("intern_vit")(Image.fromarray(arr))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (tiles * std + mean) * 255
    assert tiles.shape[0] == 3
    assert torch.allclose(pixels[0].mean((1, 2)), torch.tensor(left, dtype=torch.float32), atol=0.01)
    assert torch.allclose(pixels[1].mean((1, 2)), torch.tensor(right, dtype=torch.float32), atol=0.01)
    assert torch.allclose(pixels[2, :, :, :100].mean((1, 2)), torch.tensor(left, dtype=torch.float32), atol=0.01)


def test_video_frame_is_one_tile():
    np_rng = np.random.default_rng(SEED)
    pre = preprocessor_for("intern_vit")
    image = random_image(np_rng, (1920, 1080))
    got = pre(image, max_num=1)
    ref = reference(image, 1, IMAGENET_MEAN, IMAGENET_STD, crop=False)
    assert got.shape == (1, 3, 448, 448) and (got - ref).abs().max().item() <= ATOL, f"seed {SEED}"


def test_qwen_vl_single_tile_clip_stats():
    """Qwen-VL: Resize((448,448), BICUBIC) + CLIP mean/std = the reference without cropping."""
    np_rng = np.random.default_rng(SEED)
    pre = preprocessor_for("qwen_vit", max_num=12)  # a recipe's max_dynamic_patch does not tile Qwen-VL
    for size in [(1000, 1000), (4000, 90), (3, 7)]:
        image = random_image(np_rng, size)
        got = pre(image)
        ref = reference(image, 12, CLIP_MEAN, CLIP_STD, crop=False)
        assert got.shape == (1, 3, 448, 448) and (got - ref).abs().max().item() <= ATOL, f"seed {SEED} size {size}"


def test_recipe_cap_and_registry():
    assert preprocessor_for("intern_vit", max_num=6).num_tiles(4000, 90) == 7
    with pytest.raises(UnsupportedError, match="no image preprocessing"):
        preprocessor_for("nope")
    # Every registered vision encoder has a preprocessor agreeing on tile size and statistics.
    for name, encoder in ENCODERS.items():
        pre = PREPROCESSORS.get(name)
        assert pre is not None, f"encoder {name} has no entry in PREPROCESSORS"
        assert (pre.image_size, pre.mean, pre.std) == (encoder.image_size, tuple(encoder.mean), tuple(encoder.std)), name
