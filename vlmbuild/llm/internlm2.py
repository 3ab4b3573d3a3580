"""InternLM2 (InternVL2-2B/8B/26B). Facts: trtllm-facts §1.6, §1.9, §2.3; model-facts §1.3.

TRT-LLM runs InternLM2 as a LLaMA model: only the tensor layout differs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from vlmbuild.llm.family import Family, register, rope_scaling, rope_theta, standard_fields
from vlmbuild.llm.trtllm_config import TrtLlmConfig

log = logging.getLogger("vlmbuild.convert")

_L = "model.layers.{i}."
_T = "transformer.layers.{i}."

TENSORS = {
    "model.tok_embeddings.weight": "transformer.vocab_embedding.weight",
    _L + "attention_norm.weight": _T + "input_layernorm.weight",
    _L + "attention.wo.weight": _T + "attention.dense.weight",
    _L + "attention.wo.bias": _T + "attention.dense.bias",
    _L + "ffn_norm.weight": _T + "post_layernorm.weight",
    _L + "feed_forward.w1.weight": _T + "mlp.fc.weight",  # w1 is the activated branch = TRT "fc"
    _L + "feed_forward.w3.weight": _T + "mlp.gate.weight",  # w3 the linear one = TRT "gate"
    _L + "feed_forward.w2.weight": _T + "mlp.proj.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
}


def split_wqkv(t: torch.Tensor, cfg: TrtLlmConfig) -> dict[str, torch.Tensor]:
    """wqkv rows are grouped per kv head: [nkv, g + 2, hd, H] = g query heads, then k, then v.
    Cutting it into [Q|K|V] thirds would be wrong for GQA; de-interleave by group instead."""
    nkv, hd = cfg.num_key_value_heads, cfg.head_size
    g = cfg.num_attention_heads // nkv
    kind = "weight" if t.ndim == 2 else "bias"
    grouped = t.reshape(nkv, g + 2, hd, *t.shape[1:])
    rest = t.shape[1:]
    return {
        _T + f"attention.q.{kind}": grouped[:, :g].reshape(nkv * g * hd, *rest),  # head order kvh*g + j
        _T + f"attention.k.{kind}": grouped[:, g].reshape(nkv * hd, *rest),
        _T + f"attention.v.{kind}": grouped[:, g + 1].reshape(nkv * hd, *rest),
    }


def read_config(hf: dict[str, Any], common: dict[str, Any]) -> TrtLlmConfig:
    max_pos = hf.get("max_position_embeddings", 32768)
    scaling = rope_scaling(hf)
    if scaling and scaling.get("type", scaling.get("rope_type")) == "dynamic":
        # Dynamic NTK changes nothing below max_position_embeddings, and TRT-LLM >= 1.1 reads an
        # 'alpha' key for 'dynamic' that InternLM2 configs lack (trtllm-facts §1.9): write null.
        log.warning("rope_scaling %s written as rotary_scaling: null (dynamic NTK only acts beyond %d tokens; "
                    "TRT-LLM's 'dynamic' needs an 'alpha' InternLM2 does not define)", scaling, max_pos)
        scaling = None
    return TrtLlmConfig(
        **standard_fields(hf, norm_eps=1e-6),
        architecture=hf["architectures"][0],
        hidden_act=hf.get("hidden_act", "silu"),
        max_position_embeddings=max_pos,
        rotary_base=rope_theta(hf, 10000.0),
        rotary_scaling=scaling,
        attn_bias=bool(hf.get("bias", False)),
        **common,
    )


INTERNLM2 = register(
    Family(
        name="internlm2",
        hf_architectures=("InternLM2ForCausalLM",),
        read_config=read_config,
        tensor_map=TENSORS,
        transforms={_L + "attention.wqkv.weight": split_wqkv, _L + "attention.wqkv.bias": split_wqkv},
        stop_tokens=("<|im_end|>", "</s>"),
    )
)
