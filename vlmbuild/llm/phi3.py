"""Phi-3 (InternVL2-4B's Phi-3-mini-128k-instruct). Facts: trtllm-facts §1.8, §2.3; model-facts §1.3."""

from __future__ import annotations

from typing import Any

import torch

from vlmbuild.llm.family import Family, register, rope_theta, standard_fields
from vlmbuild.llm.trtllm_config import TrtLlmConfig

_L = "model.layers.{i}."
_T = "transformer.layers.{i}."
LONG_ROPE_FROM = 128000  # TRT-LLM switches Phi-3 to long_rope from this max_position_embeddings on

TENSORS = {
    "model.embed_tokens.weight": "transformer.vocab_embedding.weight",
    _L + "input_layernorm.weight": _T + "input_layernorm.weight",
    _L + "self_attn.o_proj.weight": _T + "attention.dense.weight",
    _L + "post_attention_layernorm.weight": _T + "post_layernorm.weight",
    _L + "mlp.down_proj.weight": _T + "mlp.proj.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}


def split_qkv(t: torch.Tensor, cfg: TrtLlmConfig) -> dict[str, torch.Tensor]:
    """qkv_proj [(nh + 2 nkv) hd, H] is contiguous [Q | K | V]."""
    q_rows = cfg.num_attention_heads * cfg.head_size
    kv_rows = cfg.num_key_value_heads * cfg.head_size
    q, k, v = t.split([q_rows, kv_rows, kv_rows], dim=0)
    return {_T + "attention.q.weight": q, _T + "attention.k.weight": k, _T + "attention.v.weight": v}


def split_gate_up(t: torch.Tensor, cfg: TrtLlmConfig) -> dict[str, torch.Tensor]:
    """gate_up_proj [2I, H] = [gate (activated); up]. As parts: fc = activated, gate = linear;
    convert fuses them per rank into TRT's swiglu order [up_r; gate_r]."""
    gate, up = t.chunk(2, dim=0)
    return {_T + "mlp.fc.weight": gate, _T + "mlp.gate.weight": up}


def read_config(hf: dict[str, Any], common: dict[str, Any]) -> TrtLlmConfig:
    max_pos = hf.get("max_position_embeddings", 4096)
    long = {}
    if max_pos >= LONG_ROPE_FROM:
        # The HF rope_scaling type ('su' / 'longrope') is not read by TRT-LLM; the factors are.
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        long = {
            "position_embedding_type": "long_rope",
            "original_max_position_embeddings": hf.get("original_max_position_embeddings")
            or scaling.get("original_max_position_embeddings", 4096),
            "longrope_scaling_short_factors": list(scaling["short_factor"]),
            "longrope_scaling_long_factors": list(scaling["long_factor"]),
        }
    return TrtLlmConfig(
        **standard_fields(hf, norm_eps=1e-5),
        architecture="Phi3ForCausalLM",
        hidden_act="swiglu",  # TRT-LLM's fused form of HF's silu-gated MLP
        max_position_embeddings=max_pos,
        rotary_base=rope_theta(hf, 10000.0),
        rotary_pct=hf.get("partial_rotary_factor", 1.0),
        **long,
        **common,
    )


PHI3 = register(
    Family(
        name="phi3",
        hf_architectures=("Phi3ForCausalLM",),
        read_config=read_config,
        tensor_map=TENSORS,
        transforms={_L + "self_attn.qkv_proj.weight": split_qkv, _L + "mlp.gate_up_proj.weight": split_gate_up},
        stop_tokens=("<|end|>", "<|endoftext|>", "</s>"),
        max_pp_size=1,  # TRT-LLM's Phi3Model builds embedding and ln_f on every rank (trtllm-facts §2.3)
    )
)
