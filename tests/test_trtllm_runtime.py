"""Pure request construction of the TensorRT-LLM Executor backend (trtllm-facts §5)."""

from __future__ import annotations

import pytest
import torch

from vlmbuild.errors import RequestError
from vlmbuild.llm.sampling import SamplingParams
from vlmbuild.llm.trtllm_config import TrtLlmConfig
from vlmbuild.llm.trtllm_runtime import plan_request, sampling_kwargs

CFG = TrtLlmConfig(architecture="Qwen2ForCausalLM", dtype="bfloat16", vocab_size=100, hidden_size=8, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_size=4, intermediate_size=16, hidden_act="silu",
                   max_position_embeddings=64, norm_epsilon=1e-6)


def test_greedy_maps_to_top_k_1_and_sampling_keeps_fields():
    assert sampling_kwargs(SamplingParams(temperature=0)) == {"top_k": 1}
    kw = sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.2, seed=3))
    assert kw == {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.2, "seed": 3}


def test_plan_casts_table_to_engine_dtype_and_sets_stops():
    table = torch.randn(6, 8)
    ids = [1, 2, 100, 101, 102, 103, 104, 105, 7]
    plan = plan_request(ids, table, SamplingParams(), [42, 43], 16, CFG, max_prompt_vocab=6)
    assert plan.embedding_table.dtype == torch.bfloat16 and plan.embedding_table.shape == (6, 8)
    assert plan.end_id == 42 and plan.stop_words == [[42], [43]]
    assert plan.input_token_ids == ids and plan.max_tokens == 16


def test_too_many_image_rows_is_a_400():
    with pytest.raises(RequestError, match="allows 4"):
        plan_request([100, 101, 102, 103, 104], torch.randn(5, 8), SamplingParams(), [1], 4, CFG, max_prompt_vocab=4)


def test_fake_ids_beyond_table_rejected():
    with pytest.raises(RequestError):
        plan_request([1, 107], torch.randn(3, 8), SamplingParams(), [1], 4, CFG, max_prompt_vocab=10)


def test_extra_ids_distinguish_images_and_leave_text_zero():
    ids = [5, 100, 101, 6, 102, 103]
    a = plan_request(ids, torch.randn(4, 8), SamplingParams(), [1], 4, CFG, 10, [b"img-a", b"img-b"], [2, 2])
    b = plan_request(ids, torch.randn(4, 8), SamplingParams(), [1], 4, CFG, 10, [b"img-a", b"img-c"], [2, 2])
    ea, eb = a.input_token_extra_ids, b.input_token_extra_ids
    assert ea[0] == ea[3] == 0 and all(e != 0 for e in (ea[1], ea[2], ea[4], ea[5]))
    assert ea[1] == ea[2] == eb[1] and ea[4] != eb[4]
