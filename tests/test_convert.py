"""`vlmbuild convert`: TRT-LLM checkpoint layout per trtllm-facts §2, accounting of every tensor, atomicity."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlmbuild.errors import CheckpointError, UnsupportedError
from vlmbuild.llm.convert import convert_checkpoint


def _qwen2(tmp_path, tie=False, vocab=101, kv=2):
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path / "hf")
    return model.state_dict(), seed


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 3)])
def test_layout_matches_trtllm_spec(tmp_path, tp, pp):
    sd, seed = _qwen2(tmp_path)
    convert_checkpoint(tmp_path / "hf", tmp_path / "trt", dtype="float32", tp_size=tp, pp_size=pp)
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert cfg["architecture"] == "Qwen2ForCausalLM" and cfg["qwen_type"] == "qwen2" and cfg["attn_bias"] is True
    stages = torch.tensor_split(torch.arange(3), pp)
    nkv_rank = max(1, 2 // tp)
    for p in range(pp):
        for r in range(tp):
            w = load_file(tmp_path / "trt" / f"rank{p * tp + r}.safetensors")
            for local, layer in enumerate(stages[p].tolist()):
                hf = f"model.layers.{layer}."
                trt = f"transformer.layers.{local}."
                # Spec: Q split by heads; K/V split, or each kv head repeated when nkv < tp.
                k_full = sd[hf + "self_attn.k_proj.weight"].reshape(2, 8, 32)
                k_full = k_full.repeat_interleave(max(1, tp // 2), 0).reshape(-1, 32)
                v_full = sd[hf + "self_attn.v_proj.weight"].reshape(2, 8, 32)
                v_full = v_full.repeat_interleave(max(1, tp // 2), 0).reshape(-1, 32)
                q = sd[hf + "self_attn.q_proj.weight"].chunk(tp)[r]
                expect_qkv = torch.cat([q, k_full.chunk(tp)[r], v_full.chunk(tp)[r]])
                assert w[trt + "attention.qkv.weight"].shape == ((4 // tp + 2 * nkv_rank) * 8, 32)
                torch.testing.assert_close(w[trt + "attention.qkv.weight"], expect_qkv, msg=f"seed {seed}")
                torch.testing.assert_close(w[trt + "attention.dense.weight"], sd[hf + "self_attn.o_proj.weight"].chunk(tp, 1)[r])
                torch.testing.assert_close(w[trt + "mlp.fc.weight"], sd[hf + "mlp.gate_proj.weight"].chunk(tp)[r])
                torch.testing.assert_close(w[trt + "mlp.gate.weight"], sd[hf + "mlp.up_proj.weight"].chunk(tp)[r])
                torch.testing.assert_close(w[trt + "mlp.proj.weight"], sd[hf + "mlp.down_proj.weight"].chunk(tp, 1)[r])
                torch.testing.assert_close(w[trt + "post_layernorm.weight"], sd[hf + "post_attention_layernorm.weight"])
            assert ("transformer.vocab_embedding.weight" in w) == (p == 0)
            assert ("lm_head.weight" in w) == (p == pp - 1) == ("transformer.ln_f.weight" in w)
            if p == pp - 1:
                padded = -(-101 // tp) * tp
                head = torch.cat([sd["lm_head.weight"], torch.zeros(padded - 101, 32)])
                torch.testing.assert_close(w["lm_head.weight"], head.chunk(tp)[r])


def test_tied_head_is_written_as_copy_of_embedding(tmp_path):
    sd, _ = _qwen2(tmp_path, tie=True)
    convert_checkpoint(tmp_path / "hf", tmp_path / "trt", dtype="bfloat16")
    w = load_file(tmp_path / "trt" / "rank0.safetensors")
    assert w["lm_head.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(w["lm_head.weight"], sd["model.embed_tokens.weight"].to(torch.bfloat16))
    assert json.loads((tmp_path / "trt" / "config.json").read_text())["tie_word_embeddings"] is True


def test_unmapped_tensors_fail_with_one_list_and_nothing_written(tmp_path):
    _qwen2(tmp_path)
    extra = {"model.layers.0.mystery.weight": torch.ones(2), "visual.proj": torch.ones(3)}
    save_file(extra, tmp_path / "hf" / "extra.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in load_file(tmp_path / "hf" / "model.safetensors")}}
    index["weight_map"].update({k: "extra.safetensors" for k in extra})
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"2 tensors .*mystery.*visual.proj|2 tensors .*visual.proj.*mystery"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "trt", dtype="float32")
    assert not (tmp_path / "trt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_unsupported_architecture(tmp_path):
    _qwen2(tmp_path)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="MambaForCausalLM"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "trt")


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from vlmbuild.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    _qwen2(tmp_path)
    cases = [
        ("convert", "--model-dir", str(tmp_path / "nope"), "-o", str(tmp_path / "a")),
        ("convert", "--model-dir", str(tmp_path), "-o", str(tmp_path / "b")),  # no config.json
    ]
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append(("convert", "--model-dir", str(tmp_path / "hf"), "-o", str(ro / "out")))
    else:
        cases.append(("convert", "--model-dir", str(tmp_path / "hf"), "-o", "/proc/vlmbuild-out"))
    for args in cases:
        proc = _cli(*args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ro")) == ["hf"]


def test_transformers5_rope_parameters_keep_their_scaling(tmp_path):
    """transformers>=5 saves rope scaling as `rope_parameters`; the scaled rope must survive convert."""
    from vlmbuild.llm.torch_runtime import TorchLLM

    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "trt", dtype="float32")
    assert json.loads((tmp_path / "trt" / "config.json").read_text())["rotary_scaling"]["type"] == "linear"
    ids = torch.randint(0, 101, (50,)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    diff = (want - TorchLLM.load(tmp_path / "trt").forward_logits(ids)).abs().max().item()
    assert diff < 1e-4, f"seed {seed}: {diff}"
