"""InternViT + mlp1 of an InternVL2 checkpoint at tiny width, real tile geometry (448 px, patch 14).

Two shape families (model-facts §2.1): InternViT-300M (LayerNorm, qkv bias, no qk-norm) for
InternVL2-1B/2B/4B/8B and InternViT-6B (RMSNorm, no qkv bias, RMS qk-norm over the full width) for 26B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlmbuild.synth.weights import Noise, Tensors

IMAGE_SIZE = 448
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 32 → 1024 patches (+1 CLS) → pixel shuffle 0.5 → 256 tokens per tile


@dataclass(frozen=True)
class VitShape:
    hidden: int
    heads: int
    intermediate: int
    layers: int
    norm_type: Literal["layer_norm", "rms_norm"]
    qkv_bias: bool
    qk_normalization: bool
    initializer_factor: float


VIT_300M = VitShape(hidden=64, heads=4, intermediate=128, layers=2, norm_type="layer_norm",
                    qkv_bias=True, qk_normalization=False, initializer_factor=1.0)
# 6B has an odd head count (25 × 128); 3 × 16 keeps that oddity at tiny width.
VIT_6B = VitShape(hidden=48, heads=3, intermediate=96, layers=2, norm_type="rms_norm",
                  qkv_bias=False, qk_normalization=True, initializer_factor=0.1)

# Hub repos whose ViT is the 6B shape family; every other InternVL2 size uses the 300M one.
VIT_BY_REPO = {"OpenGVLab/InternVL2-26B": VIT_6B}


def vit_shape(hf_repo: str | None) -> VitShape:
    return VIT_BY_REPO.get(hf_repo or "", VIT_300M)


def vision_config(s: VitShape) -> dict:
    """`vision_config` of an InternVL2 config.json (InternVisionConfig field names)."""
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",  # both sizes use this model_type
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": s.hidden,
        "image_size": IMAGE_SIZE,
        "initializer_factor": s.initializer_factor,
        "initializer_range": 1e-10,
        "intermediate_size": s.intermediate,
        "layer_norm_eps": 1e-6,
        "norm_type": s.norm_type,
        "num_attention_heads": s.heads,
        "num_channels": 3,
        "num_hidden_layers": s.layers,
        "patch_size": PATCH,
        "qk_normalization": s.qk_normalization,
        "qkv_bias": s.qkv_bias,
        "torch_dtype": "bfloat16",
        "use_flash_attn": False,
    }


def vision_tensors(s: VitShape, noise: Noise) -> Tensors:
    """`vision_model.*` tensors in module order (C = hidden, I = intermediate)."""
    c = s.hidden
    t: Tensors = {
        "vision_model.embeddings.class_embedding": noise.normal(1, 1, c, std=0.5),
        "vision_model.embeddings.patch_embedding.weight": noise.linear(c, 3 * PATCH * PATCH).view(c, 3, PATCH, PATCH),
        "vision_model.embeddings.patch_embedding.bias": noise.bias(c),
        "vision_model.embeddings.position_embedding": noise.normal(1, GRID * GRID + 1, c, std=0.3),
    }
    for i in range(s.layers):
        p = f"vision_model.encoder.layers.{i}."
        t[p + "attn.qkv.weight"] = noise.linear(3 * c, c)  # rows [Q; K; V]
        if s.qkv_bias:
            t[p + "attn.qkv.bias"] = noise.bias(3 * c)
        if s.qk_normalization:
            t[p + "attn.q_norm.weight"] = noise.norm(c)  # RMSNorm over all heads' channels
            t[p + "attn.k_norm.weight"] = noise.norm(c)
        t[p + "attn.proj.weight"] = noise.linear(c, c)
        t[p + "attn.proj.bias"] = noise.bias(c)
        t[p + "mlp.fc1.weight"] = noise.linear(s.intermediate, c)
        t[p + "mlp.fc1.bias"] = noise.bias(s.intermediate)
        t[p + "mlp.fc2.weight"] = noise.linear(c, s.intermediate)
        t[p + "mlp.fc2.bias"] = noise.bias(c)
        for norm in ("norm1", "norm2"):
            t[p + f"{norm}.weight"] = noise.norm(c)
            if s.norm_type == "layer_norm":
                t[p + f"{norm}.bias"] = noise.bias(c)
        t[p + "ls1"] = noise.layer_scale(c)
        t[p + "ls2"] = noise.layer_scale(c)
    return t


def mlp1_tensors(s: VitShape, llm_hidden: int, noise: Noise) -> Tensors:
    """Projector LayerNorm(4C) → Linear(4C, D) → GELU (index 2, no params) → Linear(D, D)."""
    c4 = 4 * s.hidden
    return {
        "mlp1.0.weight": noise.norm(c4),
        "mlp1.0.bias": noise.bias(c4),
        "mlp1.1.weight": noise.linear(llm_hidden, c4),
        "mlp1.1.bias": noise.bias(llm_hidden),
        "mlp1.3.weight": noise.linear(llm_hidden, llm_hidden),
        "mlp1.3.bias": noise.bias(llm_hidden),
    }
