"""The static decode step (what CUDA graphs replay) equals the dynamic KV-cache path token for token.

On the CPU the static step runs eagerly; on a GPU `TorchLLM.load` captures it as a CUDA graph and
the same test runs with capture (VLMBUILD_TEST_DEVICE=cuda)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_families import REFERENCES, V  # noqa: E402  (the families' transformers-made checkpoints)

from vlmbuild.llm.convert import convert_checkpoint  # noqa: E402
from vlmbuild.llm.graph_decode import GraphPool  # noqa: E402
from vlmbuild.llm.sampling import SamplingParams  # noqa: E402
from vlmbuild.llm.torch_runtime import TorchLLM  # noqa: E402

DEVICE = os.environ.get("VLMBUILD_TEST_DEVICE", "cpu")


def _llm(tmp_path, family: str, seed: int) -> tuple[TorchLLM, TorchLLM]:
    torch.manual_seed(seed)
    _, hf = REFERENCES[family](tmp_path / "hf")
    convert_checkpoint(hf, tmp_path / "trt", dtype="float32")
    dynamic = TorchLLM.load(tmp_path / "trt", device=DEVICE, cuda_graphs=False)
    static = TorchLLM.load(tmp_path / "trt", device=DEVICE)
    if static.graphs is None:  # CPU: run the static step eagerly
        static.graphs = GraphPool(static, capture=False)
    return dynamic, static


@pytest.mark.parametrize("family", sorted(REFERENCES))
def test_static_decode_equals_dynamic(tmp_path, family):
    seed = random.randrange(1 << 30)
    dynamic, static = _llm(tmp_path, family, seed)
    for n_prompt in (5, 37):  # the second request reuses the first one's cache and graph
        ids = torch.randint(0, V, (n_prompt,)).tolist()
        want = list(dynamic.generate(ids, max_new_tokens=16))
        assert list(static.generate(ids, max_new_tokens=16)) == want, f"{family} seed {seed}"
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    assert list(static.generate(ids, params=sampled, max_new_tokens=8)) == list(
        dynamic.generate(ids, params=sampled, max_new_tokens=8)), f"{family} seed {seed}"


def test_static_decode_crosses_phi3_long_rope_threshold(tmp_path):
    """Decoding from 4090 to 4102 tokens switches Phi-3 to its long factors mid-request."""
    seed = random.randrange(1 << 30)
    dynamic, static = _llm(tmp_path, "phi3", seed)
    ids = torch.randint(0, V, (4090,)).tolist()
    assert list(static.generate(ids, max_new_tokens=12)) == list(dynamic.generate(ids, max_new_tokens=12)), f"seed {seed}"
