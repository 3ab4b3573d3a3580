"""Per-family makers of the LLM half of a tiny checkpoint: tokenizer files, HF config section, tensors.

A family module (`synth/qwen2.py`, `internlm2.py`, `phi3.py`) registers one `LlmSynth`; the layout
writer joins it with a vision encoder. Tensor names are the stand-alone HF CausalLM's (InternVL2
nests them under `language_model.`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmbuild.errors import UnsupportedError
from vlmbuild.synth.vocab import Vocab
from vlmbuild.synth.weights import Noise, Tensors


@dataclass(frozen=True)
class LlmDims:
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2  # GQA, so a K/V split mistake changes shapes or numbers
    intermediate: int = 128
    layers: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY = LlmDims()


@dataclass(frozen=True)
class LlmSynth:
    family: str
    """Registry key, as in recipes."""
    write_tokenizer: Callable[[Path], Vocab]
    """Writes the tokenizer files into a directory; returns the vocabulary size and special ids."""
    config: Callable[[LlmDims, Vocab, str | None], dict]
    """(dims, vocab, hf_repo) → the LLM's HF config (InternVL2's `llm_config`)."""
    tensors: Callable[[LlmDims, int, Noise], Tensors]
    """(dims, vocab_size, noise) → HF tensors of the stand-alone CausalLM, in module order."""
    generation_config: Callable[[Vocab], dict]
    first_layer: str
    """Name prefix of layer 0; the shard boundary is put inside it."""


LLMS: dict[str, LlmSynth] = {}


def register(spec: LlmSynth) -> LlmSynth:
    LLMS[spec.family] = spec
    return spec


def get_llm(family: str) -> LlmSynth:
    # Importing a module registers its family; this list is the only place that names them.
    from vlmbuild.synth import internlm2, phi3, qwen2  # noqa: F401

    try:
        return LLMS[family]
    except KeyError:
        raise UnsupportedError(f"synth has no LLM maker for family '{family}'", hint=f"known: {', '.join(sorted(LLMS))}") from None


def head_weight(noise: Noise, vocab: int, hidden: int) -> torch.Tensor:
    """LM head [V, D] scaled so logits of a unit-RMS state have std ≈ 3: clear greedy argmaxes."""
    return noise.linear(vocab, hidden, gain=3.0)
