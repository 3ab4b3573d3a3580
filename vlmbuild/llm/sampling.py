"""Next-token selection with Hugging Face `generate` semantics, shared by the LLM backends.

Order, as in transformers' `GenerationMixin._get_logits_processor`: repetition penalty (also under
greedy), then temperature, top-k, top-p; greedy is the argmax of the penalised logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vlmbuild.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (ties with the k-th kept); 0 disables."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or the output (HF CTRL-style penalty)."""
    seed: int | None = None
    """Seed of the request's own generator; None draws a fresh one."""

    def __post_init__(self) -> None:
        checks = {
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise RequestError(f"{name}={getattr(self, name)} is out of range", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: Iterable[int], penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of every token seen so far. logits: [V]."""
    if penalty == 1.0:
        return logits
    seen = torch.tensor(sorted(set(previous_ids)), dtype=torch.long, device=logits.device)
    if seen.numel() == 0:
        return logits
    out = logits.clone()
    picked = out[seen]
    out[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop the low-probability tail whose total mass is at most 1 - p; the best token always stays."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = tail_mass <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, previous_ids: Iterable[int]) -> torch.Tensor:
    """Penalised (and, when sampling, warped) float32 logits [V]; -inf marks excluded tokens."""
    out = apply_repetition_penalty(logits.float(), previous_ids, params.repetition_penalty)
    if params.greedy:
        return out
    out = out / params.temperature
    return apply_top_p(apply_top_k(out, params.top_k), params.top_p)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                previous_ids: Iterable[int]) -> int:
    """One token id from logits [V] given the prompt + output ids so far."""
    scores = process_logits(logits, params, previous_ids)
    if params.greedy:
        return int(torch.argmax(scores))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
