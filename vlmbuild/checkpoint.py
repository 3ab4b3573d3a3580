"""Hugging Face checkpoint directory: typed top-level config and a lazy, shard-by-shard tensor reader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open

from vlmbuild.errors import CheckpointError

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


class ModelConfig(BaseModel):
    """The top-level `config.json` fields vlmbuild reads.

    InternVL2 (`internvl_chat`) nests the LLM under `llm_config` and the ViT under `vision_config`;
    Qwen-VL-Chat (`qwen`) is flat with the ViT under `visual`. `llm` / `vision` hold those raw
    sections for exactly one consumer each: the family / encoder module that parses them.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    architectures: list[str] = Field(default_factory=list)
    model_type: str = ""
    template: str | None = None
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    ps_version: str = "v1"
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    system_message: str | None = None
    llm: dict[str, Any] = Field(default_factory=dict)
    vision: dict[str, Any] = Field(default_factory=dict)

    @property
    def llm_architecture(self) -> str:
        archs = self.llm.get("architectures") or []
        if not archs:
            raise CheckpointError("config.json names no LLM architecture (llm_config.architectures is empty)")
        return archs[0]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        if "llm_config" in raw:  # InternVL2
            llm, vision = raw["llm_config"], raw.get("vision_config", {})
        else:  # a plain causal LM (Qwen-VL-Chat keeps its ViT under `visual`)
            llm = {k: v for k, v in raw.items() if k != "visual"}
            vision = raw.get("visual", {})
        return cls.model_validate({**raw, "llm": llm, "vision": vision})


class HfCheckpoint:
    """A checkpoint directory in the original Hugging Face layout, read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model directory {self.path} does not exist", hint="pass --model-dir of a downloaded checkpoint")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path} has no config.json", hint="is this a Hugging Face checkpoint directory?")
        try:
            self.raw_config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8"))
            self.config = ModelConfig.from_dict(self.raw_config)
        except (json.JSONDecodeError, ValidationError) as err:
            raise CheckpointError(f"{cfg} is not a valid model config: {str(err).splitlines()[0]}") from err
        self._open: dict[Path, Any] = {}

    @cached_property
    def weight_map(self) -> dict[str, Path]:
        """Tensor name → file that holds it."""
        for index in _INDEXES:
            p = self.path / index
            if p.is_file():
                wm = json.loads(p.read_text(encoding="utf-8"))["weight_map"]
                missing = sorted({f for f in wm.values() if not (self.path / f).is_file()})
                if missing:
                    raise CheckpointError(f"{self.path} is missing weight shards: {', '.join(missing)}", hint="re-run vlmbuild download")
                return {k: self.path / f for k, f in wm.items()}
        for single in _SINGLES:
            p = self.path / single
            if p.is_file():
                return {k: p for k in self._keys(p)}
        raise CheckpointError(f"{self.path} holds no weights (*.safetensors or pytorch_model*.bin)", hint="re-run vlmbuild download")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shards(self) -> list[tuple[Path, list[str]]]:
        """Files in order, each with the tensor names it holds, for shard-by-shard passes."""
        by_file: dict[Path, list[str]] = {}
        for name, f in self.weight_map.items():
            by_file.setdefault(f, []).append(name)
        return sorted(by_file.items())

    def get(self, name: str) -> torch.Tensor:
        try:
            f = self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} not found in {self.path}") from None
        return self._handle(f)(name)

    def iter_prefix(self, prefix: str, strip: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors whose name starts with `prefix`, shard by shard."""
        for _, names in self.shards():
            for name in names:
                if name.startswith(prefix):
                    yield (name[len(prefix):] if strip else name), self.get(name)

    def close(self) -> None:
        """Drop open shard handles so their memory can be released."""
        self._open.clear()

    def _handle(self, f: Path):
        if f not in self._open:
            if len(self._open) >= 2:  # keep at most two shards mapped
                self._open.pop(next(iter(self._open)))
            if f.suffix == ".safetensors":
                st = safe_open(str(f), framework="pt")
                self._open[f] = st.get_tensor
            else:  # PyTorch pickle (Qwen-VL-Chat); mmap keeps it lazy
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                self._open[f] = sd.__getitem__
        return self._open[f]

    @staticmethod
    def _keys(f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                return list(st.keys())
        return list(torch.load(f, map_location="cpu", mmap=True, weights_only=True).keys())
