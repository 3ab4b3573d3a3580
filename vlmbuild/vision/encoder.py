"""Vision encoders as registered values: what a tile looks like, which tensors they read, how to build them.

An encoder module (`vision/<encoder>.py`) defines one `Encoder` and calls `register`; `vision/__init__.py`
imports each encoder module once. Nothing outside those modules branches on the encoder name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import CheckpointError, UnsupportedError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class VisionTower(Protocol):
    """What every encoder's module offers: pixels [N, 3, S, S] → features [N, out_tokens, out_hidden]."""

    out_tokens: int
    out_hidden: int

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Encoder:
    """One vision encoder: tile format, consumed tensors, module factory and numeric tolerance."""

    name: str
    architectures: tuple[str, ...]
    """HF `architectures[0]` values whose checkpoints carry this encoder."""
    image_size: int
    """Side of one square input tile in pixels."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokens_per_patch: int
    """Output tokens per tile (rows of the prompt table)."""
    prefixes: tuple[str, ...]
    """Checkpoint tensor-name prefixes this encoder consumes (the LLM conversion skips them)."""
    build: Callable[[HfCheckpoint, torch.dtype], nn.Module]
    """Module with weights loaded, in eval mode and the given dtype; it satisfies `VisionTower`."""
    tolerance: Mapping[str, float]
    """Export dtype → largest accepted relative error (max |got − ref| / max |ref|) vs the fp32 module."""

    def tolerance_for(self, dtype: str) -> float:
        try:
            return self.tolerance[dtype]
        except KeyError:
            raise UnsupportedError(f"encoder {self.name} has no tolerance for dtype {dtype}",
                                   hint=f"use one of {', '.join(self.tolerance)}") from None


ENCODERS: dict[str, Encoder] = {}


def register(encoder: Encoder) -> Encoder:
    ENCODERS[encoder.name] = encoder
    return encoder


def get_encoder(name: str) -> Encoder:
    try:
        return ENCODERS[name]
    except KeyError:
        raise UnsupportedError(f"unknown vision encoder '{name}'", hint=f"choose one of {', '.join(sorted(ENCODERS))}") from None


def encoder_for(ckpt: HfCheckpoint) -> Encoder:
    """The encoder whose `architectures` claims the checkpoint's `architectures[0]`."""
    archs = ckpt.config.architectures
    if not archs:
        raise CheckpointError(f"{ckpt.path}/config.json names no architecture", hint="expected e.g. InternVLChatModel")
    for encoder in ENCODERS.values():
        if archs[0] in encoder.architectures:
            return encoder
    known = sorted(a for e in ENCODERS.values() for a in e.architectures)
    raise UnsupportedError(f"no vision encoder for architecture {archs[0]}", hint=f"supported: {', '.join(known)}")


def load_state(module: nn.Module, ckpt: HfCheckpoint, prefixes: tuple[str, ...]) -> nn.Module:
    """Load every tensor under `prefixes` by its checkpoint name into `module` (built on the meta device).

    The module's parameter names equal the checkpoint names, so the name map is the identity;
    a missing or unexpected tensor fails with one error listing them all.
    """
    state = {name: t for p in prefixes for name, t in ckpt.iter_prefix(p, strip=False)}
    expected = dict(module.state_dict())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(n for n in set(state) & set(expected) if state[n].shape != expected[n].shape)
    problems = [f"missing {', '.join(missing)}"] * bool(missing) + [f"unexpected {', '.join(unexpected)}"] * bool(unexpected)
    problems += [f"{n}: {tuple(state[n].shape)} vs expected {tuple(expected[n].shape)}" for n in bad_shape]
    if problems:
        raise CheckpointError(f"vision weights in {ckpt.path} do not match the config: {'; '.join(problems)}")
    module.load_state_dict(state, assign=True)
    return module.eval().requires_grad_(False)
