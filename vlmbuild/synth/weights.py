"""Random tensors that make mapping mistakes visible, and the sharded files Hugging Face writes.

Every tensor is distinct noise: norm weights are 1 + noise (never all ones), biases and layer scales
are non-zero and differ per channel and per layer, so a swapped, transposed or dropped tensor changes
the output. Linear weights are scaled by 1/sqrt(fan_in) so activations stay O(1) through the layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmbuild.fsutil import write_json

Tensors = dict[str, torch.Tensor]


class Noise:
    """Seeded maker of float32 tensors; `finish` casts them to the checkpoint dtype."""

    def __init__(self, seed: int):
        self._gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self._gen) * std + mean

    def linear(self, out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        """[out, in] with unit-variance outputs for unit-variance inputs (times `gain`)."""
        return self.normal(out_features, in_features, std=gain / math.sqrt(in_features))

    def bias(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.1)

    def norm(self, n: int) -> torch.Tensor:
        """Norm weight near 1, so a norm applied to the wrong tensor is still well-scaled but wrong."""
        return self.normal(n, std=0.1, mean=1.0)

    def layer_scale(self, n: int) -> torch.Tensor:
        """InternViT ls1/ls2: positive, all channels different, in [0.3, 0.7)."""
        return 0.3 + 0.4 * torch.rand(n, generator=self._gen)


def finish(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    return {name: t.to(dtype).contiguous() for name, t in tensors.items()}


def split_point(names: list[str], marker: str) -> int:
    """Index in `names` half-way through the tensors containing `marker`, so that group spans both shards."""
    group = [k for k, name in enumerate(names) if marker in name]
    return group[len(group) // 2]


def write_safetensors_shards(out: Path, tensors: Tensors, cut: int) -> None:
    """`model-0000{1,2}-of-00002.safetensors` + `model.safetensors.index.json`, split at key index `cut`."""
    names = list(tensors)
    files = {"model-00001-of-00002.safetensors": names[:cut], "model-00002-of-00002.safetensors": names[cut:]}
    for fname, keys in files.items():
        save_file({k: tensors[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
    _write_index(out / "model.safetensors.index.json", tensors, files)


def write_bin_shards(out: Path, tensors: Tensors, cut: int) -> None:
    """`pytorch_model-0000{1,2}-of-00002.bin` (pickled state dicts) + `pytorch_model.bin.index.json`."""
    names = list(tensors)
    files = {"pytorch_model-00001-of-00002.bin": names[:cut], "pytorch_model-00002-of-00002.bin": names[cut:]}
    for fname, keys in files.items():
        torch.save({k: tensors[k] for k in keys}, out / fname)
    _write_index(out / "pytorch_model.bin.index.json", tensors, files)


def _write_index(path: Path, tensors: Tensors, files: dict[str, list[str]]) -> None:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {k: fname for fname, keys in files.items() for k in keys}
    write_json(path, {"metadata": {"total_size": total}, "weight_map": weight_map})
