"""InternViT (300M and 6B shapes) + drop CLS + pixel shuffle v2 + mlp1, as one exportable module.

Math from OpenGVLab/InternVL `internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py` and
`modeling_internvl_chat.py::extract_feature` (docs/model-facts.md §2). Parameter names equal the
checkpoint names (`vision_model.*`, `mlp1.*`), so loading is a by-name copy with no rename table.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import CheckpointError, UnsupportedError
from vlmbuild.vision.encoder import Encoder, load_state, register

IMAGE_SIZE = 448
PREFIXES = ("vision_model.", "mlp1.")


class InternVitConfig(BaseModel):
    """The raw `vision_config` fields InternViT reads; defaults are InternVisionConfig's (6B shape)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: Literal["layer_norm", "rms_norm"] = "rms_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: Literal["gelu"] = "gelu"
    image_size: int = IMAGE_SIZE
    patch_size: int = 14
    num_channels: Literal[3] = 3

    @property
    def grid(self) -> int:
        """Patches per side: 448 // 14 = 32."""
        return self.image_size // self.patch_size


class TowerConfig(BaseModel):
    """ViT + the InternVLChatModel fields that shape its output."""

    model_config = ConfigDict(frozen=True)

    vit: InternVitConfig
    llm_hidden: int
    """D: output width of mlp1 (the LLM hidden size)."""
    depth: int
    """ViT layers actually run: `select_layer` -1 = all; hidden_states[k] is the output of k layers."""
    scale: int
    """Pixel-shuffle factor 1 / downsample_ratio (2: a 2x2 block of tokens becomes one token of width 4C)."""

    @property
    def out_grid(self) -> int:
        return self.vit.grid // self.scale

    @classmethod
    def from_checkpoint(cls, ckpt: HfCheckpoint) -> "TowerConfig":
        cfg = ckpt.config
        try:
            vit = InternVitConfig.model_validate(cfg.vision)
        except ValidationError as err:
            raise CheckpointError(f"{ckpt.path}/config.json vision_config is not an InternViT config: {str(err).splitlines()[0]}") from err
        if cfg.ps_version != "v2":
            raise UnsupportedError(f"ps_version '{cfg.ps_version}' is not supported, expected 'v2'",
                                   hint="all released InternVL2 checkpoints use v2")
        size = cfg.force_image_size or vit.image_size
        if size != vit.image_size or size != IMAGE_SIZE:
            # The checkpoint's position embedding covers vision_config.image_size; another tile size needs a resized table.
            raise UnsupportedError(f"InternViT tile size {size} (vision_config.image_size {vit.image_size}) is not supported, "
                                   f"expected {IMAGE_SIZE}")
        scale = round(1 / cfg.downsample_ratio)
        if abs(scale * cfg.downsample_ratio - 1) > 1e-6 or vit.grid % scale:
            raise UnsupportedError(f"downsample_ratio {cfg.downsample_ratio} does not divide the {vit.grid}x{vit.grid} patch grid")
        depth = cfg.select_layer % (vit.num_hidden_layers + 1)
        if "hidden_size" not in cfg.llm:
            raise CheckpointError(f"{ckpt.path}/config.json llm_config has no hidden_size (the mlp1 output width)")
        return cls(vit=vit, llm_hidden=cfg.llm["hidden_size"], depth=depth, scale=scale)


class RMSNorm(nn.Module):
    """`InternRMSNorm`: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norm(cfg: InternVitConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.layer_norm_eps)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: InternVitConfig):
        super().__init__()
        c = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)  # rows = [Q; K; V]
        self.proj = nn.Linear(c, c)
        # 6B: RMSNorm of q and k over the full width C (all heads together), before the head split.
        self.q_norm = RMSNorm(c, cfg.layer_norm_eps) if cfg.qk_normalization else nn.Identity()
        self.k_norm = RMSNorm(c, cfg.layer_norm_eps) if cfg.qk_normalization else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x [N, T, C]
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.reshape(n, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))  # [N, h, T, d]
        # No mask; scale d**-0.5 (SDPA's default) as in `_naive_attn`. Exports as MatMul/Softmax at opset 17.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, cfg: InternVitConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-norm block with layer scale: h += ls1 * attn(norm1(h)); h += ls2 * mlp(norm2(h))."""

    def __init__(self, cfg: InternVitConfig):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg, cfg.hidden_size), _norm(cfg, cfg.hidden_size)
        self.attn, self.mlp = Attention(cfg), Mlp(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.ls1 * self.attn(self.norm1(h))
        return h + self.ls2 * self.mlp(self.norm2(h))


class Embeddings(nn.Module):
    def __init__(self, cfg: InternVitConfig):
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, c))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [N, C, 32, 32] → [N, 1024, C]
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        # The original always runs a bicubic resize of the 32x32 table to the input grid; inputs are fixed
        # at the pretraining size (checked in TowerConfig), where that resize is an exact identity.
        return torch.cat([cls, patches], dim=1) + self.position_embedding  # [N, 1025, C]


class VitEncoder(nn.Module):
    def __init__(self, cfg: InternVitConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))


class VisionModel(nn.Module):
    def __init__(self, cfg: InternVitConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = VitEncoder(cfg)


class InternVitTower(nn.Module):
    """pixels [N, 3, 448, 448] → ViT → drop CLS → pixel shuffle v2 → mlp1 → [N, 256, D]. No final ViT norm."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        wide = cfg.vit.hidden_size * cfg.scale**2  # 4C
        self.vision_model = VisionModel(cfg.vit)
        # nn.Sequential indices match the checkpoint: mlp1.0 LayerNorm, mlp1.1 Linear, (2 = GELU), mlp1.3 Linear.
        self.mlp1 = nn.Sequential(nn.LayerNorm(wide), nn.Linear(wide, cfg.llm_hidden), nn.GELU(), nn.Linear(cfg.llm_hidden, cfg.llm_hidden))
        self.out_tokens = cfg.out_grid**2
        self.out_hidden = cfg.llm_hidden

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.vision_model.embeddings(pixel_values)
        for block in self.vision_model.encoder.layers[: self.cfg.depth]:
            h = block(h)
        return self.mlp1(self.pixel_shuffle(h[:, 1:]))

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[N, g*g, C] → [N, (g/s)^2, s*s*C]: the `ps_version='v2'` view/permute chain of `InternVLChatModel.pixel_shuffle`.

        For s = 2, out[i, j] = concat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]) on the 32x32 grid.
        All sizes are static except the batch (-1), so the exported graph needs no shape arithmetic.
        """
        g, s, c = self.cfg.vit.grid, self.cfg.scale, self.cfg.vit.hidden_size
        x = x.reshape(-1, g, g // s, c * s)  # view(n, w, h/s, c*s)
        x = x.permute(0, 2, 1, 3).reshape(-1, g // s, g // s, c * s * s)  # → [n, h/s, w/s, c*s*s]
        return x.permute(0, 2, 1, 3).reshape(-1, (g // s) ** 2, c * s * s)  # v2: permute back


def build_intern_vit(ckpt: HfCheckpoint, dtype: torch.dtype) -> InternVitTower:
    """Module with the checkpoint's `vision_model.*` / `mlp1.*` tensors, in `dtype`, eval mode."""
    cfg = TowerConfig.from_checkpoint(ckpt)
    with torch.device("meta"):
        tower = InternVitTower(cfg)
    return load_state(tower, ckpt, PREFIXES).to(dtype)


INTERN_VIT = register(
    Encoder(
        name="intern_vit",
        architectures=("InternVLChatModel",),
        image_size=IMAGE_SIZE,
        mean=(0.485, 0.456, 0.406),  # ImageNet (model-facts §3)
        std=(0.229, 0.224, 0.225),
        tokens_per_patch=256,
        prefixes=PREFIXES,
        build=build_intern_vit,
        tolerance={"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2},
    )
)
