"""The torch backend runs converted TRT-LLM checkpoints exactly like transformers' Qwen2ForCausalLM.

Every checkpoint is made by `convert_checkpoint` from a `save_pretrained` directory of a fresh
random transformers model. Tolerance (float32): max |logits diff| ≤ 1e-4; greedy tokens equal.
The seed is drawn per run and printed in every assertion message.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlmbuild.errors import CheckpointError, RequestError, UnsupportedError
from vlmbuild.llm.convert import convert_checkpoint
from vlmbuild.llm.sampling import SamplingParams
from vlmbuild.llm.torch_runtime import TorchLLM

TOL = 1e-4
VOCAB = 317  # odd on purpose: lm_head gets padded rows under tp > 1
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=64,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
CONFIGS = {
    "gqa4q2kv-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa8q2kv-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}
SEED = random.randrange(2**31)


@dataclass
class Case:
    name: str
    model: Qwen2ForCausalLM
    hf_dir: Path
    root: Path

    def checkpoint(self, tp: int = 1, pp: int = 1, **kwargs) -> Path:
        out = self.root / f"trt-tp{tp}-pp{pp}-{'-'.join(f'{k}{v}' for k, v in kwargs.items())}"
        if not out.exists():
            convert_checkpoint(self.hf_dir, out, dtype="float32", tp_size=tp, pp_size=pp, **kwargs)
        return out

    def ids(self, n: int, offset: int = 0) -> list[int]:
        gen = torch.Generator().manual_seed(SEED + offset)
        return torch.randint(0, VOCAB, (n,), generator=gen).tolist()

    @torch.inference_mode()
    def logits(self, ids: list[int] | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        if embeds is not None:
            return self.model(inputs_embeds=embeds[None]).logits[0].float()
        return self.model(torch.tensor([ids])).logits[0].float()

    @torch.inference_mode()
    def greedy(self, ids: list[int] | None, steps: int, embeds: torch.Tensor | None = None) -> list[int]:
        kwargs = {"inputs_embeds": embeds[None]} if embeds is not None else {"input_ids": torch.tensor([ids])}
        out = self.model.generate(**kwargs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        return out[0, -steps:].tolist()


def _random_model(config: Qwen2Config, seed: int) -> Qwen2ForCausalLM:
    """Weights far from transformers' tiny init, so logits are spread and mistakes show."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model


def _make_case(name: str, root: Path, **overrides) -> Case:
    model = _random_model(Qwen2Config(**{**BASE, **CONFIGS[name], **overrides}), SEED)
    model.save_pretrained(root / "hf")
    return Case(name, model, root / "hf", root)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    return _make_case(request.param, tmp_path_factory.mktemp(request.param))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"seed={SEED}: shapes {list(a.shape)} vs {list(b.shape)}"
    return (a - b).abs().max().item()


def test_logits_match_transformers(case: Case) -> None:
    ids = case.ids(17)
    got = TorchLLM.load(case.checkpoint()).forward_logits(ids)
    err = _max_diff(got, case.logits(ids))
    assert err <= TOL, f"seed={SEED} {case.name}: max |logits diff| {err:.2e} > {TOL}"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_sharded_checkpoint_runs_like_tp1(case: Case, tp: int, pp: int) -> None:
    """Reassembling the shards proves the TP/PP split (tp 4 > 2 kv heads duplicates kv heads)."""
    ids = case.ids(11, offset=1)
    whole = TorchLLM.load(case.checkpoint()).forward_logits(ids)
    sharded = TorchLLM.load(case.checkpoint(tp, pp)).forward_logits(ids)
    assert _max_diff(sharded, whole) <= 1e-6, f"seed={SEED} {case.name} tp={tp} pp={pp}: differs from tp=1"
    err = _max_diff(sharded, case.logits(ids))
    assert err <= TOL, f"seed={SEED} {case.name} tp={tp} pp={pp}: differs from transformers by {err:.2e}"


def test_greedy_generation_matches_transformers(case: Case) -> None:
    ids = case.ids(9, offset=2)
    got = list(TorchLLM.load(case.checkpoint(2, 1)).generate(ids, max_new_tokens=20))
    assert got == case.greedy(ids, 20), f"seed={SEED} {case.name}: greedy tokens differ with the KV cache"


def test_prompt_table_rows_replace_fake_ids(case: Case) -> None:
    """ids vocab_size + k take table row k: same as transformers fed inputs_embeds with those rows."""
    gen = torch.Generator().manual_seed(SEED + 3)
    ids = case.ids(14, offset=3)
    table = 0.15 * torch.randn(10, BASE["hidden_size"], generator=gen)
    rows = torch.randperm(10, generator=gen)[:6]
    ids[4:10] = (VOCAB + rows).tolist()
    with torch.no_grad():
        embeds = case.model.get_input_embeddings()(torch.tensor([min(i, VOCAB - 1) for i in ids]))
        embeds[4:10] = table[rows]
    llm = TorchLLM.load(case.checkpoint())
    err = _max_diff(llm.forward_logits(ids, table), case.logits(embeds=embeds))
    assert err <= TOL, f"seed={SEED} {case.name}: prompt-table logits differ by {err:.2e}"
    got = list(llm.generate(ids, table, max_new_tokens=8))
    assert got == case.greedy(None, 8, embeds=embeds), f"seed={SEED} {case.name}: prompt-table greedy tokens differ"


def test_sampling_matches_transformers_with_the_same_seed(tmp_path: Path) -> None:
    """One seeded draw per step from the same processed distribution ⇒ the same tokens (CPU RNG)."""
    case = _make_case("gqa4q2kv-untied", tmp_path)
    ids = case.ids(6, offset=4)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=SEED)
    got = list(TorchLLM.load(case.checkpoint()).generate(ids, params=params, max_new_tokens=16))
    torch.manual_seed(SEED)
    with torch.inference_mode():
        want = case.model.generate(torch.tensor([ids]), do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                                   repetition_penalty=1.1, max_new_tokens=16, min_new_tokens=16)[0, 6:].tolist()
    assert got == want, f"seed={SEED}: sampled tokens differ from transformers' with the same seed"


def test_greedy_repetition_penalty_matches_transformers(case: Case) -> None:
    """The penalty covers prompt and output tokens so far (greedy output of random weights loops)."""
    ids = case.ids(6, offset=9)
    llm = TorchLLM.load(case.checkpoint())
    got = list(llm.generate(ids, params=SamplingParams(repetition_penalty=1.5), max_new_tokens=20))
    with torch.inference_mode():
        want = case.model.generate(torch.tensor([ids]), do_sample=False, repetition_penalty=1.5,
                                   max_new_tokens=20, min_new_tokens=20)[0, 6:].tolist()
    assert got == want, f"seed={SEED} {case.name}: penalised greedy tokens differ"


def test_stop_token_ends_the_stream(case: Case) -> None:
    ids = case.ids(5, offset=5)
    llm = TorchLLM.load(case.checkpoint())
    full = list(llm.generate(ids, max_new_tokens=12))
    stop = full[6]
    got = list(llm.generate(ids, stop_token_ids={stop}, max_new_tokens=12))
    assert got == full[: full.index(stop) + 1], f"seed={SEED}: stream did not end at the first stop token {stop}"


ROPE_VARIANTS = {
    # name: (transformers rope_parameters, TRT-LLM config keys, prompt lengths)
    "linear": ({"rope_type": "linear", "factor": 2.0}, {"rotary_scaling": {"type": "linear", "factor": 2.0}}, (10, 50)),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0},
                {"rotary_scaling": {"type": "dynamic", "factor": 2.0}}, (10, 90)),
    "longrope": ({"rope_type": "longrope", "original_max_position_embeddings": 16},
                 {"position_embedding_type": "long_rope", "original_max_position_embeddings": 16,
                  "rotary_scaling": None}, (10, 40)),  # as the Phi-3 converter writes it
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rotary_scaling_matches_transformers(variant: str, tmp_path: Path) -> None:
    """Linear and dynamic NTK (past max positions), and Phi-3 long rope on either side of the
    original max positions; the TRT config keys are set as the converters write them (§1.5, §1.8)."""
    hf_rope, trt_keys, lengths = ROPE_VARIANTS[variant]
    half = BASE["hidden_size"] // CONFIGS["gqa4q2kv-untied"]["num_attention_heads"] // 2
    gen = torch.Generator().manual_seed(SEED)
    short, long = (1 + torch.rand(half, generator=gen)).tolist(), (1 + 4 * torch.rand(half, generator=gen)).tolist()
    if variant == "longrope":
        hf_rope = {**hf_rope, "short_factor": short, "long_factor": long}
        trt_keys = {**trt_keys, "longrope_scaling_short_factors": short, "longrope_scaling_long_factors": long}
    case = _make_case("gqa4q2kv-untied", tmp_path, rope_parameters={**hf_rope, "rope_theta": 10000.0})
    path = case.checkpoint() / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **trt_keys}))
    llm = TorchLLM.load(path.parent)
    for n in lengths:
        ids = case.ids(n, offset=n)
        err = _max_diff(llm.forward_logits(ids), case.logits(ids))
        assert err <= TOL, f"seed={SEED} {variant} T={n}: max |logits diff| {err:.2e} > {TOL}"
    ids = case.ids(lengths[0], offset=6)
    got = list(llm.generate(ids, max_new_tokens=16))
    assert got == case.greedy(ids, 16), f"seed={SEED} {variant}: greedy tokens differ"


def test_swiglu_layout_with_tp(tmp_path: Path) -> None:
    """Phi-3 style fused MLP: rank r's fc is [gate_r; fc_r] (linear half first, trtllm-facts §2.3);
    rewriting a tp=2 GatedMLP checkpoint that way must not change the logits."""
    case = _make_case("gqa4q2kv-untied", tmp_path)
    ckpt = case.checkpoint(2, 1)
    for r in range(2):
        tensors = load_file(ckpt / f"rank{r}.safetensors")
        for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
            fc = name.replace("mlp.gate.", "mlp.fc.")
            tensors[fc] = torch.cat([tensors.pop(name), tensors[fc]], dim=0)  # [2 I/tp, H]
        save_file(tensors, ckpt / f"rank{r}.safetensors")
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_act": "swiglu"}))
    ids = case.ids(12, offset=7)
    err = _max_diff(TorchLLM.load(ckpt).forward_logits(ids), case.logits(ids))
    assert err <= TOL, f"seed={SEED}: swiglu logits differ by {err:.2e}"


def test_weight_only_checkpoint_runs_float_weights(tmp_path: Path, caplog) -> None:
    case = _make_case("mha-tied", tmp_path)
    ids = case.ids(7, offset=8)
    with caplog.at_level(logging.INFO, logger="vlmbuild.llm.torch_runtime"):
        llm = TorchLLM.load(case.checkpoint(weight_only="int8"))
    assert "W8A16" in caplog.text and "unquantized" in caplog.text
    assert _max_diff(llm.forward_logits(ids), case.logits(ids)) <= TOL, f"seed={SEED}"


def test_errors_are_one_line_and_typed(tmp_path: Path) -> None:
    case = _make_case("mha-tied", tmp_path)
    llm = TorchLLM.load(case.checkpoint())
    with pytest.raises(RequestError, match="model allows 64"):
        llm.generate(case.ids(64), max_new_tokens=4)  # raised at the call, before any iteration
    with pytest.raises(RequestError, match="hidden size is 64"):
        llm.generate([VOCAB], torch.zeros(1, 32))
    with pytest.raises(RequestError, match="table has 2 rows"):
        llm.forward_logits([1, VOCAB + 2], torch.zeros(2, BASE["hidden_size"]))
    with pytest.raises(CheckpointError, match="config.json"):
        TorchLLM.load(tmp_path / "nowhere")
    sharded = case.checkpoint(2, 1)
    (sharded / "rank1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rank1.safetensors"):
        TorchLLM.load(sharded)
    ckpt = case.checkpoint()
    tensors = load_file(ckpt / "rank0.safetensors")
    tensors["transformer.layers.0.mlp.proj.weight"] = tensors["transformer.layers.0.mlp.proj.weight"].to(torch.int8)
    save_file(tensors, ckpt / "rank0.safetensors")
    with pytest.raises(UnsupportedError, match="pre-quantized"):
        TorchLLM.load(ckpt)


def test_qwen_logn_scaling_starts_past_seq_length(tmp_path: Path) -> None:
    """QWen v1 (Qwen-VL-Chat, use_logn_attn) scales q by log_{seq_length}(p + 1) only for 1-based
    positions past seq_length: earlier logits stay transformers' Qwen2, later ones move."""
    case = _make_case("mha-tied", tmp_path)
    path = case.checkpoint() / "config.json"
    logn = {"qwen_type": "qwen", "use_logn_attn": True, "seq_length": 8}
    path.write_text(json.dumps({**json.loads(path.read_text()), **logn}))
    ids = case.ids(14, offset=10)
    got, want = TorchLLM.load(path.parent).forward_logits(ids), case.logits(ids)
    assert _max_diff(got[:8], want[:8]) <= TOL, f"seed={SEED}: logn scaling acted at or before seq_length"
    assert _max_diff(got[8:], want[8:]) > 1e-3, f"seed={SEED}: logn scaling did not act past seq_length"
