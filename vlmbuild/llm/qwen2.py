"""Qwen2 (InternVL2-1B's Qwen2-0.5B-Instruct). Facts: trtllm-facts §1.7, §2.3."""

from __future__ import annotations

from typing import Any

from vlmbuild.llm.family import Family, register, rope_scaling, rope_theta, standard_fields
from vlmbuild.llm.trtllm_config import TrtLlmConfig

_L = "model.layers.{i}."
_T = "transformer.layers.{i}."

TENSORS = {
    "model.embed_tokens.weight": "transformer.vocab_embedding.weight",
    _L + "input_layernorm.weight": _T + "input_layernorm.weight",
    _L + "self_attn.q_proj.weight": _T + "attention.q.weight",
    _L + "self_attn.k_proj.weight": _T + "attention.k.weight",
    _L + "self_attn.v_proj.weight": _T + "attention.v.weight",
    _L + "self_attn.q_proj.bias": _T + "attention.q.bias",
    _L + "self_attn.k_proj.bias": _T + "attention.k.bias",
    _L + "self_attn.v_proj.bias": _T + "attention.v.bias",
    _L + "self_attn.o_proj.weight": _T + "attention.dense.weight",
    _L + "post_attention_layernorm.weight": _T + "post_layernorm.weight",
    _L + "mlp.gate_proj.weight": _T + "mlp.fc.weight",  # TRT-LLM "fc" is the activated branch
    _L + "mlp.up_proj.weight": _T + "mlp.gate.weight",  # ... and "gate" the linear one
    _L + "mlp.down_proj.weight": _T + "mlp.proj.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}


def read_config(hf: dict[str, Any], common: dict[str, Any]) -> TrtLlmConfig:
    return TrtLlmConfig(
        **standard_fields(hf, norm_eps=1e-6),
        architecture=hf["architectures"][0],
        qwen_type=hf.get("model_type", "qwen2"),
        hidden_act=hf.get("hidden_act", "silu"),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rotary_base=rope_theta(hf, 1000000.0),
        rotary_scaling=rope_scaling(hf),
        attn_bias=True,  # Qwen2 has q/k/v biases (o_proj none)
        seq_length=hf.get("seq_length", 8192),
        use_logn_attn=False,
        **common,
    )


QWEN2 = register(
    Family(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        read_config=read_config,
        tensor_map=TENSORS,
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
    )
)
