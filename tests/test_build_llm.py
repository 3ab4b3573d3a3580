"""`vlmbuild build-llm`: the trtllm-build command line from a recipe, and its behaviour without TRT-LLM."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlmbuild.llm.build import trtllm_build_command

# The reference guide's InternVL2-8B build (grps-trtllm docs), with the 1.x spelling of the
# deprecated `--paged_kv_cache enable` (= `--kv_cache_type paged`).
SEED_FLAGS = {
    "--gemm_plugin": "bfloat16", "--max_batch_size": "2", "--kv_cache_type": "paged",
    "--max_input_len": "32768", "--max_seq_len": "60416", "--max_num_tokens": "32768", "--max_multimodal_len": "13312",
}


def _flags(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1, 2) if argv[i].startswith("--")}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from vlmbuild.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_trtllm_checkpoint(tmp_path_factory):
    from vlmbuild.llm.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "hf")
    convert_checkpoint(root / "hf", root / "trt", dtype="float32")
    return root / "trt"


def test_dry_run_reproduces_seed_flags_for_internvl2_8b(tiny_trtllm_checkpoint, tmp_path):
    proc = _run("build-llm", "--checkpoint-dir", str(tiny_trtllm_checkpoint), "--output-dir", str(tmp_path / "eng"),
                "--recipe", "internvl2-8b", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip())
    assert argv[0] == "trtllm-build"
    flags = _flags(argv)
    for flag, value in SEED_FLAGS.items():
        assert flags.get(flag) == value, (flag, flags)
    assert flags["--checkpoint_dir"] == str(tiny_trtllm_checkpoint)
    assert "--paged_kv_cache" not in flags  # deprecated in 1.x
    assert not (tmp_path / "eng").exists()


def test_command_includes_paged_context_fmha_when_recipe_sets_it(tmp_path):
    from vlmbuild.recipe import load_recipe

    r = load_recipe("qwen-vl-chat")
    flags = _flags(trtllm_build_command(tmp_path, tmp_path / "o", r.llm, r.max_multimodal_len))
    assert flags["--use_paged_context_fmha"] == "enable"
    assert flags["--max_input_len"] == "30720" and flags["--max_seq_len"] == "32768"
    assert flags["--max_multimodal_len"] == str(2 * 26 * 256)


def test_without_tensorrt_llm_says_checkpoint_is_ready(tiny_trtllm_checkpoint, tmp_path):
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("tensorrt_llm"):
        pytest.skip("tensorrt_llm is installed here")
    proc = _run("build-llm", "--checkpoint-dir", str(tiny_trtllm_checkpoint), "--output-dir", str(tmp_path / "eng"))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "checkpoint" in lines[0] and "ready" in lines[0] and "--llm-backend torch" in lines[0]
    assert not (tmp_path / "eng").exists()


def test_missing_rank_file_is_one_line_error(tiny_trtllm_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_trtllm_checkpoint, broken)
    (broken / "rank0.safetensors").unlink()
    proc = _run("build-llm", "--checkpoint-dir", str(broken), "--dry-run")
    assert proc.returncode == 1 and "rank0.safetensors" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
