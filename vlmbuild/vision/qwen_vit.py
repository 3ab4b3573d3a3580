"""Qwen-VL-Chat's `transformer.visual`: ViT-bigG/14 at 448 + the 256-query cross-attention resampler.

Math from Qwen/Qwen-VL-Chat `visual.py` (`VisionTransformer`, `VisualAttention`, `Resampler`,
`get_abs_pos`), as summarised in docs/model-facts.md §5.2. Parameter names equal the checkpoint
names (`transformer.visual.*`), so loading is a by-name copy with no rename table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import CheckpointError, UnsupportedError
from vlmbuild.vision.encoder import Encoder, load_state, register

IMAGE_SIZE = 448
PREFIXES = ("transformer.visual.",)
LN_EPS = 1e-6  # visual.py: norm_layer = partial(nn.LayerNorm, eps=1e-6) everywhere
POOL_HEAD_DIM = 128  # Resampler heads = output_dim // 128
QUERIES = 256  # Resampler(grid_size=16): 256 learned queries = output tokens


class QwenVitConfig(BaseModel):
    """The `visual` section of Qwen-VL-Chat's flat config.json."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: int
    patch_size: int = 14
    image_size: int = IMAGE_SIZE

    @property
    def grid(self) -> int:
        """Patches per side: 448 // 14 = 32."""
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # int(1664 * 4.9231) = 8192, as visual.py computes it

    @property
    def pool_heads(self) -> int:
        return self.output_dim // POOL_HEAD_DIM

    @classmethod
    def from_checkpoint(cls, ckpt: HfCheckpoint) -> "QwenVitConfig":
        try:
            cfg = cls.model_validate(ckpt.config.vision)
        except ValidationError as err:
            raise CheckpointError(f"{ckpt.path}/config.json `visual` is not a Qwen-VL config: {str(err).splitlines()[0]}") from err
        if cfg.image_size != IMAGE_SIZE or cfg.image_size % cfg.patch_size:
            raise UnsupportedError(f"Qwen-VL image_size {cfg.image_size} / patch_size {cfg.patch_size} is not supported, "
                                   f"expected {IMAGE_SIZE} split into whole patches")
        if cfg.width % cfg.heads or cfg.output_dim % POOL_HEAD_DIM or cfg.pool_heads == 0:
            raise CheckpointError(f"{ckpt.path}/config.json `visual`: width {cfg.width} must divide into {cfg.heads} heads "
                                  f"and output_dim {cfg.output_dim} into heads of {POOL_HEAD_DIM}")
        return cfg


def resize_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """`get_abs_pos`: a square table [s*s, C] → [side*side, C], bicubic (align_corners=False) in fp32.

    Identity when s == side. Tables and input size are fixed, so the result is computed once at load
    and the exported graph holds it as a constant instead of a Resize node.
    """
    src = math.isqrt(table.shape[0])
    if src == side:
        return table.float()
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, C, s, s]
    out = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(side * side, -1)


class VisualAttention(nn.Module):
    def __init__(self, cfg: QwenVitConfig):
        super().__init__()
        self.heads = cfg.heads
        # Rows interleaved per head: output viewed as [.., heads, 3 * head_dim] = q|k|v of each head in turn.
        self.in_proj = nn.Linear(cfg.width, 3 * cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.in_proj(x).reshape(n, t, self.heads, 3, c // self.heads).permute(3, 0, 2, 1, 4)  # [3, N, h, T, d]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # q / sqrt(d), softmax, no mask
        return self.out_proj(out.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, cfg: QwenVitConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # nn.GELU: exact (erf)


class Block(nn.Module):
    """`VisualAttentionBlock`: x += attn(ln_1(x)); x += mlp(ln_2(x)). Batch-first here; the original's LND is a transpose."""

    def __init__(self, cfg: QwenVitConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.width, eps=LN_EPS), nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.attn, self.mlp = VisualAttention(cfg), Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PoolAttention(nn.Module):
    """nn.MultiheadAttention's weights (`in_proj_weight` [3D, D] = [Q; K; V] blocks) run as plain ops for export."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Lq, D], k/v [N, Lk, D] → [N, Lq, D]."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        heads = [self._split(F.linear(x, w, b)) for x, w, b in ((q, wq, bq), (k, wk, bk), (v, wv, bv))]
        out = F.scaled_dot_product_attention(*heads)  # [N, h, Lq, d]
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        return x.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)  # [N, h, T, d]


class Resampler(nn.Module):
    """256 learned queries (+ 16x16 sin-cos pos_embed) attend to the 1024 patch tokens (+ pos_embed resized to 32x32)."""

    def __init__(self, cfg: QwenVitConfig):
        super().__init__()
        d = cfg.output_dim
        self.query = nn.Parameter(torch.empty(QUERIES, d))
        self.pos_embed = nn.Parameter(torch.empty(QUERIES, d))  # fixed 2-D sin-cos, stored in the checkpoint
        self.kv_proj = nn.Linear(cfg.width, d, bias=False)
        self.attn = PoolAttention(d, cfg.pool_heads)
        self.ln_q, self.ln_kv = nn.LayerNorm(d, eps=LN_EPS), nn.LayerNorm(d, eps=LN_EPS)
        self.register_buffer("key_pos", torch.empty(cfg.grid**2, d), persistent=False)  # set by `prepare`

    def prepare(self, grid: int) -> None:
        self.key_pos = resize_table(self.pos_embed, grid).to(self.pos_embed.dtype)  # [1024, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))  # [N, 1024, D]
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)  # [N, 256, D]
        return self.attn(q, kv + self.key_pos, kv)


class BlockStack(nn.Module):
    def __init__(self, cfg: QwenVitConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: QwenVitConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(QUERIES, cfg.width))  # 16x16 table, resized to the grid
        self.ln_pre, self.ln_post = nn.LayerNorm(cfg.width, eps=LN_EPS), nn.LayerNorm(cfg.output_dim, eps=LN_EPS)
        self.transformer = BlockStack(cfg)
        self.attn_pool = Resampler(cfg)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))  # used as x @ proj, not a Linear
        self.register_buffer("patch_pos", torch.empty(cfg.grid**2, cfg.width), persistent=False)  # set by `prepare`


class QwenVitTower(nn.Module):
    """pixels [N, 3, 448, 448] → conv → +pos → ln_pre → blocks → resampler → ln_post → @proj → [N, 256, output_dim]."""

    def __init__(self, cfg: QwenVitConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict({"visual": VisionTransformer(cfg)})  # names: transformer.visual.*
        self.out_tokens = QUERIES
        self.out_hidden = cfg.output_dim

    def prepare(self) -> "QwenVitTower":
        """Resize the fixed position tables to the 32x32 patch grid once the weights are loaded (see `resize_table`)."""
        v = self.transformer["visual"]
        v.patch_pos = resize_table(v.positional_embedding, self.cfg.grid).to(v.positional_embedding.dtype)
        v.attn_pool.prepare(self.cfg.grid)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.transformer["visual"]
        x = v.conv1(pixel_values).flatten(2).transpose(1, 2)  # [N, C, 32, 32] → [N, 1024, C]
        x = v.ln_pre(x + v.patch_pos)
        for block in v.transformer.resblocks:
            x = block(x)
        return v.ln_post(v.attn_pool(x)) @ v.proj


def build_qwen_vit(ckpt: HfCheckpoint, dtype: torch.dtype) -> QwenVitTower:
    """Module with the checkpoint's `transformer.visual.*` tensors, in `dtype`, eval mode."""
    cfg = QwenVitConfig.from_checkpoint(ckpt)
    with torch.device("meta"):
        tower = QwenVitTower(cfg)
    # The tables' shapes ([256, C], [256, D]) are checked by load_state; `prepare` replaces the meta buffers.
    # Cast first: the original resizes tables of the run dtype (fp32 from a bf16 checkpoint keeps the resize unrounded).
    return load_state(tower, ckpt, PREFIXES).to(dtype).prepare()


QWEN_VIT = register(
    Encoder(
        name="qwen_vit",
        architectures=("QWenLMHeadModel",),
        image_size=IMAGE_SIZE,
        mean=(0.48145466, 0.4578275, 0.40821073),  # CLIP (model-facts §5.2)
        std=(0.26862954, 0.26130258, 0.27577711),
        tokens_per_patch=QUERIES,
        prefixes=PREFIXES,
        build=build_qwen_vit,
        tolerance={"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2},
    )
)
