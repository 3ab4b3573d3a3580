"""LLM families: the per-family facts as one registered `Family` value each.

A family module (qwen2.py, internlm2.py, phi3.py, qwen.py) says three things and nothing else:
  * how its HF config becomes a `TrtLlmConfig`;
  * a table from HF tensor names (`{i}` = layer) to TRT-LLM *part* names;
  * named transforms for fused HF tensors (e.g. InternLM2 `wqkv`), producing several parts.
Parts are TRT-LLM names, except that attention arrives as separate `attention.{q,k,v}.*` parts:
`convert.py` fuses them into `attention.qkv` per tensor-parallel rank (and for `swiglu` families
fuses `mlp.fc` + `mlp.gate` into one `mlp.fc`), so no family module knows about sharding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmbuild.errors import UnsupportedError
from vlmbuild.llm.trtllm_config import TrtLlmConfig

# A transform maps one HF tensor to several parts (names may contain `{i}`).
Transform = Callable[[torch.Tensor, TrtLlmConfig], dict[str, torch.Tensor]]
# Reads the HF LLM config section into a TrtLlmConfig (dtype/mapping/quantization filled by convert).
ConfigReader = Callable[[dict[str, Any], dict[str, Any]], TrtLlmConfig]


@dataclass(frozen=True)
class Family:
    name: str
    """Registry key, as written in recipes."""
    hf_architectures: tuple[str, ...]
    """`architectures[0]` values of the HF LLM config that this family converts."""
    read_config: ConfigReader
    """(hf_llm_config, common TRT fields) → TrtLlmConfig."""
    tensor_map: Mapping[str, str]
    """HF name → TRT part name; `{i}` is the layer index."""
    transforms: Mapping[str, Transform] = field(default_factory=dict)
    """HF name → transform producing several parts, for fused tensors."""
    skip_prefixes: tuple[str, ...] = ()
    """HF name prefixes that belong to other models in the same checkpoint (e.g. a ViT)."""
    stop_tokens: tuple[str, ...] = ()
    """Tokens that end generation besides the template's separator."""
    max_pp_size: int | None = None
    """Largest pipeline-parallel size TRT-LLM's model class supports (None: any)."""

    def patterns(self) -> list[tuple[re.Pattern[str], str, Transform | None]]:
        """Compiled (regex, part template or HF template, transform) for every mapped HF name."""
        out = []
        for hf, part in self.tensor_map.items():
            out.append((_template_regex(hf), part, None))
        for hf, fn in self.transforms.items():
            out.append((_template_regex(hf), hf, fn))
        return out


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def _load_all() -> None:
    # Importing a family module registers it; the list is the only place that names them.
    from vlmbuild.llm import internlm2, phi3, qwen, qwen2  # noqa: F401


def get_family(name: str) -> Family:
    _load_all()
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedError(f"unknown LLM family '{name}'", hint=f"known: {', '.join(sorted(FAMILIES))}") from None


def family_for_architecture(arch: str) -> Family:
    _load_all()
    for fam in FAMILIES.values():
        if arch in fam.hf_architectures:
            return fam
    known = sorted(a for f in FAMILIES.values() for a in f.hf_architectures)
    raise UnsupportedError(f"LLM architecture '{arch}' is not supported", hint=f"supported: {', '.join(known)}")


def rope_theta(hf: dict[str, Any], default: float) -> float:
    """rope_theta from an old-style config or a transformers>=5 `rope_parameters` block."""
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", default))


def rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    """rope_scaling from an old-style config, or from transformers>=5's `rope_parameters` when it
    scales (rope_type other than 'default'); None when the rope is unscaled."""
    if hf.get("rope_scaling"):
        return dict(hf["rope_scaling"])
    params = hf.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    return {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")} | {"type": kind}


def standard_fields(hf: dict[str, Any], norm_eps: float) -> dict[str, Any]:
    """TrtLlmConfig shape fields from the HF names Qwen2, InternLM2 and Phi-3 share."""
    hidden, heads, layers, inter, vocab = require(
        hf, "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"
    )
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "head_size": hf.get("head_dim") or hidden // heads,
        "intermediate_size": inter,
        "norm_epsilon": hf.get("rms_norm_eps", norm_eps),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def require(hf: dict[str, Any], *keys: str) -> list[Any]:
    """Values of required HF config keys, or one error naming all that are missing."""
    missing = [k for k in keys if k not in hf]
    if missing:
        from vlmbuild.errors import CheckpointError

        raise CheckpointError(f"LLM config lacks {', '.join(missing)}", hint="is config.json complete?")
    return [hf[k] for k in keys]
