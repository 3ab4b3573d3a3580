"""QWen v1 (Qwen-VL-Chat's QWen-7B). Facts: trtllm-facts §1.7, §2.3; model-facts §5.3."""

from __future__ import annotations

from typing import Any

import torch

from vlmbuild.llm.family import Family, register, require
from vlmbuild.llm.trtllm_config import TrtLlmConfig

_L = "transformer.h.{i}."
_T = "transformer.layers.{i}."

TENSORS = {
    "transformer.wte.weight": "transformer.vocab_embedding.weight",
    _L + "ln_1.weight": _T + "input_layernorm.weight",
    _L + "attn.c_proj.weight": _T + "attention.dense.weight",
    _L + "ln_2.weight": _T + "post_layernorm.weight",
    _L + "mlp.w2.weight": _T + "mlp.fc.weight",  # c_proj(w1(x) * silu(w2(x))): w2 is activated = TRT "fc"
    _L + "mlp.w1.weight": _T + "mlp.gate.weight",
    _L + "mlp.c_proj.weight": _T + "mlp.proj.weight",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}


def split_c_attn(t: torch.Tensor, cfg: TrtLlmConfig) -> dict[str, torch.Tensor]:
    """c_attn [3H, H] (bias [3H]) is contiguous [Q; K; V] (MHA)."""
    kind = "weight" if t.ndim == 2 else "bias"
    q, k, v = t.chunk(3, dim=0)
    return {_T + f"attention.q.{kind}": q, _T + f"attention.k.{kind}": k, _T + f"attention.v.{kind}": v}


def read_config(hf: dict[str, Any], common: dict[str, Any]) -> TrtLlmConfig:
    hidden, heads, layers, inter, vocab = require(
        hf, "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"
    )
    return TrtLlmConfig(
        architecture=hf["architectures"][0],
        qwen_type="qwen",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_size=hf.get("kv_channels") or hidden // heads,
        # Stored as HF's value (22016 for 7B): TRT-LLM's QWen halves it, matching w1/w2 [11008, H].
        intermediate_size=inter,
        hidden_act="silu",
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        rotary_base=float(hf.get("rotary_emb_base", 10000)),
        rotary_scaling=None,  # use_dynamic_ntk is not read by TRT-LLM; it only acts beyond seq_length
        attn_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        seq_length=hf.get("seq_length", 8192),
        use_logn_attn=bool(hf.get("use_logn_attn", False)),
        **common,
    )


QWEN = register(
    Family(
        name="qwen",
        hf_architectures=("QWenLMHeadModel",),
        read_config=read_config,
        tensor_map=TENSORS,
        transforms={_L + "attn.c_attn.weight": split_c_attn, _L + "attn.c_attn.bias": split_c_attn},
        skip_prefixes=("transformer.visual.",),
        stop_tokens=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
    )
)
