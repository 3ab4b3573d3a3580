"""sampling.py against transformers' own logits processors on fresh random logits."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlmbuild.errors import RequestError
from vlmbuild.llm.sampling import SamplingParams, process_logits, sample_next

VOCAB = 257
CASES = [
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=10),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.5, repetition_penalty=1.2),
    SamplingParams(temperature=0.5, top_p=0.01, repetition_penalty=0.8),
]


def _hf_scores(logits: torch.Tensor, params: SamplingParams, previous: list[int]) -> torch.Tensor:
    """transformers' chain in `_get_logits_processor` order: penalty, then temperature, top-k, top-p."""
    ids, scores = torch.tensor([previous]), logits[None].clone()
    chain = [RepetitionPenaltyLogitsProcessor(params.repetition_penalty)] if params.repetition_penalty != 1.0 else []
    if not params.greedy:
        chain.append(TemperatureLogitsWarper(params.temperature))
        chain += [TopKLogitsWarper(params.top_k)] if params.top_k else []
        chain += [TopPLogitsWarper(params.top_p)] if params.top_p < 1.0 else []
    for proc in chain:
        scores = proc(ids, scores)
    return scores[0]


def _draw(seed: int) -> tuple[torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=gen) * 3
    previous = torch.randint(0, VOCAB, (30,), generator=gen).tolist()
    return logits, previous


def _case_id(p: SamplingParams) -> str:
    return f"t{p.temperature}-k{p.top_k}-p{p.top_p}-r{p.repetition_penalty}"


@pytest.mark.parametrize("params", CASES, ids=_case_id)
def test_processed_logits_match_transformers(params: SamplingParams) -> None:
    seed = random.randrange(2**31)
    logits, previous = _draw(seed)
    got, want = process_logits(logits, params, previous), _hf_scores(logits, params, previous)
    kept = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), kept), f"seed={seed}: different tokens were filtered"
    assert kept.any(), f"seed={seed}: every token filtered"
    err = (got[kept] - want[kept]).abs().max().item()
    assert err <= 1e-6, f"seed={seed}: max |diff| {err} > 1e-6"


@pytest.mark.parametrize("params", CASES, ids=_case_id)
def test_sample_next_draws_from_the_transformers_distribution(params: SamplingParams) -> None:
    """Same generator state ⇒ same draw as multinomial over transformers' probabilities; greedy = argmax."""
    seed = random.randrange(2**31)
    logits, previous = _draw(seed)
    want_scores = _hf_scores(logits, params, previous)
    for draw in range(5):
        ours = sample_next(logits, params, torch.Generator().manual_seed(seed + draw), previous)
        if params.greedy:
            want = int(torch.argmax(want_scores))
        else:
            gen = torch.Generator().manual_seed(seed + draw)
            want = int(torch.multinomial(want_scores.softmax(-1), 1, generator=gen))
        assert ours == want, f"seed={seed} draw={draw}: sampled {ours}, transformers' distribution gives {want}"
        assert torch.isfinite(want_scores[ours]), f"seed={seed}: sampled a filtered token {ours}"


def test_seeded_generator_is_reproducible() -> None:
    seed = random.randrange(2**31)
    logits, previous = _draw(seed)
    params = SamplingParams(temperature=1.5, seed=seed)
    first = [sample_next(logits, params, g, previous) for g in [params.generator()] for _ in range(20)]
    second = [sample_next(logits, params, g, previous) for g in [params.generator()] for _ in range(20)]
    assert first == second, f"seed={seed}: the same request seed gave different tokens"
    assert len(set(first)) > 1, f"seed={seed}: temperature 1.5 over {VOCAB} tokens should not repeat one token 20 times"


@pytest.mark.parametrize("bad", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1},
                                 {"repetition_penalty": 0.0}])
def test_out_of_range_parameters_are_request_errors(bad: dict) -> None:
    with pytest.raises(RequestError, match=next(iter(bad))):
        SamplingParams(**bad)
