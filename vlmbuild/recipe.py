"""Recipes: one YAML per model size under `recipes/`, parsed into a typed `Recipe`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlmbuild.errors import ConfigError

Dtype = Literal["bfloat16", "float16", "float32"]
WeightOnly = Literal["int8", "int4"]

RECIPES_DIR = Path(os.environ.get("VLMBUILD_RECIPES", Path(__file__).resolve().parent.parent / "recipes"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class LlmBuild(_Strict):
    """`trtllm-build` parameters (1.x flag names) and the image budget they imply."""

    gemm_plugin: str = "auto"
    """`--gemm_plugin`: 'auto' (= model dtype), a dtype, or 'disable'."""
    max_batch_size: int = Field(2, ge=1)
    """`--max_batch_size`: concurrent sequences in one engine step; more requests queue."""
    kv_cache_type: Literal["paged", "continuous"] = "paged"
    """`--kv_cache_type` (replaces the deprecated `--paged_kv_cache enable`)."""
    use_paged_context_fmha: bool | None = None
    """`--use_paged_context_fmha enable|disable`; None leaves the trtllm-build default."""
    max_input_len: int = Field(32768, ge=1)
    """`--max_input_len`: longest prompt in tokens, image tokens included."""
    max_seq_len: int = Field(60416, ge=1)
    """`--max_seq_len`: prompt + generated tokens."""
    max_num_tokens: int = Field(32768, ge=1)
    """`--max_num_tokens`: tokens per engine step with remove_input_padding."""
    max_patches_per_request: int = Field(26, ge=1)
    """Image patches (448x448 tiles, thumbnails included) one request may carry."""

    @model_validator(mode="after")
    def _lengths(self) -> "LlmBuild":
        if self.max_seq_len < self.max_input_len:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must be >= max_input_len ({self.max_input_len})")
        return self


class VitBuild(_Strict):
    """Vision-engine build: ONNX export dtype and the TensorRT batch (= tiles) profile."""

    dtype: Dtype = "bfloat16"
    """Dtype of the exported ONNX graph and engine I/O."""
    min_batch: int = Field(1, ge=1)
    """Smallest batch of tiles in the optimization profile."""
    opt_batch: int = Field(13, ge=1)
    """Batch the builder tunes for (one image of 12 tiles + thumbnail)."""
    max_batch: int = Field(26, ge=1)
    """Largest batch of tiles one engine call accepts."""

    @model_validator(mode="after")
    def _profile(self) -> "VitBuild":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        return self


class Recipe(_Strict):
    """Everything needed to go from a Hugging Face checkpoint to served engines for one model size."""

    name: str
    """Recipe name (file stem)."""
    description: str = ""
    """One line for `vlmbuild recipes`."""
    hf_repo: str | None = None
    """Hugging Face repo id to download; None for synthetic (test/demo) recipes."""
    revision: str = "main"
    """Hub revision (branch, tag or commit)."""
    layout_of: str | None = None
    """Synthetic recipes: the hub repo whose checkpoint layout `vlmbuild synth` reproduces (default: hf_repo)."""
    family: str
    """LLM family key in the registry (qwen2, internlm2, phi3, qwen); checked against config.json."""
    vision: str
    """Vision encoder key in the registry (intern_vit, qwen_vit)."""
    template: str
    """Chat template name (Hermes-2, internlm2-chat, phi3-chat, chatml)."""
    dtype: Dtype = "bfloat16"
    """Dtype of the TensorRT-LLM checkpoint."""
    tp_size: int = Field(1, ge=1)
    """Tensor-parallel ranks."""
    pp_size: int = Field(1, ge=1)
    """Pipeline-parallel ranks."""
    weight_only: WeightOnly | None = None
    """Weight-only quantization (W8A16 / W4A16, applied by trtllm-build on the target GPU)."""
    max_dynamic_patch: int = Field(12, ge=1)
    """Most tiles one image is cut into (a thumbnail is added when >1)."""
    tokens_per_patch: int = Field(256, ge=1)
    """LLM tokens one 448x448 tile becomes after the vision encoder."""
    llm: LlmBuild = LlmBuild()
    """LLM engine build parameters."""
    vit: VitBuild = VitBuild()
    """Vision engine build parameters."""

    @property
    def layout_repo(self) -> str | None:
        """The hub repo whose layout this recipe's checkpoints have."""
        return self.layout_of or self.hf_repo

    @property
    def max_multimodal_len(self) -> int:
        """Prompt-table rows the engine reserves: batch x patches per request x tokens per patch."""
        return self.llm.max_batch_size * self.llm.max_patches_per_request * self.tokens_per_patch

    def resolved(self) -> dict:
        """The recipe with derived values, for display and manifests."""
        data = self.model_dump(mode="json")
        data["derived"] = {"max_multimodal_len": self.max_multimodal_len, "world_size": self.tp_size * self.pp_size}
        return data


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a recipe by name (from `recipes/`) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no recipe '{name_or_path}'", hint=f"choose one of: {', '.join(recipe_names())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        data.setdefault("name", path.stem)
        return Recipe.model_validate(data)
    except (yaml.YAMLError, ValidationError) as err:
        first = str(err).replace("\n", " ")
        raise ConfigError(f"recipe {path} is invalid: {first}") from err
