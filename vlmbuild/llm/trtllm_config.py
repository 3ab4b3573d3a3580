"""The TensorRT-LLM checkpoint `config.json` (trtllm-facts §1), written by convert, read by runtimes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from vlmbuild.errors import CheckpointError

QUANT_ALGOS = {None: None, "int8": "W8A16", "int4": "W4A16"}
# A checkpoint `dtype` → the torch dtype its weights are held in.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TrtMapping(BaseModel):
    """Only the keys every TRT-LLM version's `Mapping(**d)` accepts (unknown keys raise there)."""

    model_config = ConfigDict(extra="forbid")
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1


class TrtQuantization(BaseModel):
    """`QuantConfig(**d)`; like the reference converters we write quant_algo only."""

    model_config = ConfigDict(extra="forbid")
    quant_algo: Literal["W8A16", "W4A16"] | None = None


class TrtLlmConfig(BaseModel):
    """Top-level keys of a TRT-LLM checkpoint config. Unknown top-level keys are tolerated by
    TRT-LLM (set as attributes), so `extra="allow"` lets us read configs written by other tools."""

    model_config = ConfigDict(extra="allow")

    architecture: str
    dtype: Literal["float32", "float16", "bfloat16"]
    logits_dtype: str = "float32"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    hidden_act: Literal["silu", "swiglu", "gelu"]
    max_position_embeddings: int
    norm_epsilon: float
    position_embedding_type: Literal["rope_gpt_neox", "long_rope"] = "rope_gpt_neox"
    rotary_base: float = 10000.0
    rotary_scaling: dict[str, Any] | None = None
    rotary_pct: float | None = None
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    attn_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    mapping: TrtMapping = TrtMapping()
    quantization: TrtQuantization = TrtQuantization()
    # QWen (qwen_type 'qwen' / 'qwen2') and Phi-3 long-rope keys; absent unless the family sets them.
    qwen_type: str | None = None
    seq_length: int | None = None
    use_logn_attn: bool | None = None
    original_max_position_embeddings: int | None = None
    longrope_scaling_short_factors: list[float] | None = None
    longrope_scaling_long_factors: list[float] | None = None

    # Keys whose null is meaningful and is written explicitly (rotary_scaling: see internlm2).
    _KEEP_NULL = ("rotary_scaling",)

    def to_json_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if v is not None or k in self._KEEP_NULL}

    @property
    def gated_mlp(self) -> bool:
        """silu → GatedMLP with separate fc (activated) and gate; swiglu → one fused fc."""
        return self.hidden_act != "swiglu"

    @property
    def world_size(self) -> int:
        return self.mapping.tp_size * self.mapping.pp_size

    @classmethod
    def read(cls, checkpoint_dir: str | Path) -> "TrtLlmConfig":
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{checkpoint_dir} has no config.json", hint="run vlmbuild convert first")
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, ValidationError) as err:
            raise CheckpointError(f"{path} is not a TensorRT-LLM checkpoint config: {str(err).splitlines()[0]}") from err
