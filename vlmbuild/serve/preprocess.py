"""Image → normalized tiles `[n_tiles, 3, S, S]` float32, as the vision encoders were trained.

InternVL2 `dynamic_preprocess` (docs/model-facts.md §3, from OpenGVLab/InternVL
`internvl_chat/README.md` quick-start): choose the tile grid whose aspect ratio is closest to the
image's, resize the image to that grid with PIL BICUBIC, cut it row-major, append a whole-image
thumbnail when there is more than one tile. Qwen-VL is the same recipe with one tile
(`Resize((448, 448), BICUBIC)`, CLIP mean/std, §5.2), so both are one `Preprocessor` with different
data; `PREPROCESSORS` maps a vision encoder name to its value. Video frames use `max_num=1`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from vlmbuild.errors import UnsupportedError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=64)
def target_ratios(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Grids (columns, rows) with min_num <= tiles <= max_num, ordered by tile count.

    Built as InternVL builds it (a set, then a stable sort by area), so grids of equal area keep the
    set's iteration order, which the tie rule below can observe.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def closest_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """InternVL `find_closest_aspect_ratio`: smallest |w/h − i/j|; on an exact tie take the later
    (larger) grid only while the image area exceeds half the grid's pixel area."""
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in target_ratios(min_num, max_num):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * image_size * image_size * grid[0] * grid[1]:
            best = grid
    return best


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Tiles of `image_size`², row-major over the chosen grid, thumbnail last when tiles > 1."""
    cols, rows = closest_grid(image.width, image.height, min_num, max_num, image_size)
    # PIL's default filter for RGB resize is BICUBIC, which is what InternVL's bare `resize` uses.
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop(((k % cols) * image_size, (k // cols) * image_size, (k % cols + 1) * image_size, (k // cols + 1) * image_size))
        for k in range(cols * rows)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def to_tensor(tiles: list[Image.Image], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """torchvision `ToTensor` + `Normalize` on every tile, same float32 ops → [n, 3, S, S]."""
    hwc = torch.from_numpy(np.stack([np.asarray(t.convert("RGB"), dtype=np.uint8) for t in tiles]))  # [n, S, S, 3]
    chw = hwc.permute(0, 3, 1, 2).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return chw.sub(m).div(s).contiguous()


@dataclass(frozen=True)
class Preprocessor:
    """One encoder's input recipe; `max_num=1` means a single resized tile (Qwen-VL, video frames)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_num: int = 12
    """Most tiles per image before the thumbnail (InternVL `max_dynamic_patch`)."""
    min_num: int = 1
    use_thumbnail: bool = True
    tiles_from_recipe: bool = True
    """Whether a recipe's `max_dynamic_patch` replaces `max_num` (False: the encoder takes one tile)."""

    def _max(self, max_num: int | None) -> int:
        return self.max_num if max_num is None else max(self.min_num, min(max_num, self.max_num))

    def num_tiles(self, width: int, height: int, max_num: int | None = None) -> int:
        """Tiles `__call__` will produce for a width x height image, thumbnail included."""
        cols, rows = closest_grid(width, height, self.min_num, self._max(max_num), self.image_size)
        return cols * rows + (1 if self.use_thumbnail and cols * rows != 1 else 0)

    def __call__(self, image: Image.Image, max_num: int | None = None) -> torch.Tensor:
        """RGB image → [n_tiles, 3, image_size, image_size] float32; `max_num` may only lower the cap."""
        tiles = dynamic_preprocess(image.convert("RGB"), self.min_num, self._max(max_num), self.image_size, self.use_thumbnail)
        return to_tensor(tiles, self.mean, self.std)


# Vision encoder name (vision/<encoder>.py) → its preprocessing, as data.
PREPROCESSORS: dict[str, Preprocessor] = {
    "intern_vit": Preprocessor(448, IMAGENET_MEAN, IMAGENET_STD, max_num=12),
    "qwen_vit": Preprocessor(448, CLIP_MEAN, CLIP_STD, max_num=1, tiles_from_recipe=False),
}

# Video frames: one tile each (InternVL `load_video(max_num=1)`).
FRAME_MAX_TILES = 1


def preprocessor_for(encoder: str, max_num: int | None = None) -> Preprocessor:
    """The encoder's preprocessor; `max_num` (a recipe's `max_dynamic_patch`) replaces its tile cap."""
    try:
        base = PREPROCESSORS[encoder]
    except KeyError:
        raise UnsupportedError(f"no image preprocessing for vision encoder '{encoder}'", hint=f"known: {', '.join(sorted(PREPROCESSORS))}") from None
    if max_num is None or not base.tiles_from_recipe:
        return base
    return replace(base, max_num=max_num)
