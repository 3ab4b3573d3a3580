"""Streamed text equals the final decode, even where byte-fallback runs are rewritten by later tokens."""

from __future__ import annotations

import random

import pytest

from vlmbuild.recipe import load_recipe
from vlmbuild.serve.engine import Detokenizer
from vlmbuild.synth import synth_checkpoint
from vlmbuild.tokenizer import load_tokenizer


@pytest.fixture(scope="module", params=["tiny-internvl2-1b", "tiny-internvl2-2b", "tiny-internvl2-4b"])
def tok(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "hf"
    synth_checkpoint(load_recipe(request.param), path)
    return load_tokenizer(path)


def _stream(tok, ids, stops=()):
    d = Detokenizer(tok, list(stops))
    out = []
    for t in ids:
        text, hit = d.push(t)
        out.append(text)
        if hit:
            break
    out.append(d.flush())
    return "".join(out)


def test_streamed_text_equals_full_decode_on_random_ids(tok):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert _stream(tok, ids) == tok.decode(ids), f"seed {seed}: {ids}"


def test_stop_string_cuts_the_text(tok):
    ids = tok.encode("hello world, this is a test")
    full = tok.decode(ids)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert _stream(tok, ids, [stop]) == full[: full.index(stop)]
