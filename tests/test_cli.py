"""The CLI's contract: recipes listing, one-line errors for the user's mistakes, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from vlmbuild.recipe import load_recipe, recipe_names
from vlmbuild.synth import synth_checkpoint

EXPECTED = {"internvl2-1b", "internvl2-2b", "internvl2-4b", "internvl2-8b", "internvl2-26b", "qwen-vl-chat"}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "from vlmbuild.cli import main; main()", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def _one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_recipes_listed_and_shown_with_derived_values():
    assert EXPECTED <= set(recipe_names())
    proc = _cli("recipes")
    assert proc.returncode == 0 and all(name[:12] in proc.stdout for name in EXPECTED)
    shown = _cli("recipes", "show", "internvl2-8b").stdout
    assert "max_multimodal_len: 13312" in shown and "hf_repo: OpenGVLab/InternVL2-8B" in shown
    r = load_recipe("internvl2-8b")
    assert r.max_multimodal_len == r.llm.max_batch_size * r.llm.max_patches_per_request * 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "hf"
    synth_checkpoint(load_recipe("tiny-internvl2-1b"), path)
    return path


def _copy(tiny, tmp_path):
    dst = tmp_path / "work" / "hf"
    shutil.copytree(tiny, dst)
    return dst


def test_build_with_missing_tokenizer_is_one_line_and_writes_nothing(tiny, tmp_path):
    hf = _copy(tiny, tmp_path)
    for f in ("vocab.json", "merges.txt"):
        (hf / f).unlink()
    _one_line_error(_cli("build", "tiny-internvl2-1b", "--workdir", str(tmp_path / "work")), "tokenizer", "vlmbuild download")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["hf"]


def test_build_with_unsupported_architecture(tiny, tmp_path):
    hf = _copy(tiny, tmp_path)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["llm_config"]["architectures"] = ["MixtralForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    _one_line_error(_cli("build", "--workdir", str(tmp_path / "work")), "MixtralForCausalLM", "not supported")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["hf"]


def test_build_with_wrong_model_dir(tmp_path):
    _one_line_error(_cli("build", "tiny-internvl2-1b", "--workdir", str(tmp_path / "w"), "--model-dir", str(tmp_path / "nope")),
                    "no checkpoint")
    _one_line_error(_cli("build-vit", "--model-dir", str(tmp_path), "-o", str(tmp_path / "v")), "config.json")
    assert not (tmp_path / "w").exists() and not (tmp_path / "v").exists()


def test_recipe_family_must_match_checkpoint(tiny, tmp_path):
    _one_line_error(_cli("convert", "internvl2-8b", "--model-dir", str(tiny), "-o", str(tmp_path / "c")), "internlm2", "Qwen2ForCausalLM")
    assert not (tmp_path / "c").exists()


def test_build_reports_steps(tiny, tmp_path):
    _copy(tiny, tmp_path)
    proc = _cli("build", "tiny-internvl2-1b", "--workdir", str(tmp_path / "work"), "--builder", "none")
    assert proc.returncode == 0, proc.stderr
    for step in ("convert", "vision-onnx", "vision-engine", "llm-engine"):
        assert step in proc.stdout
    assert "skipped" in proc.stdout
    manifest = json.loads((tmp_path / "work" / "manifest.json").read_text())
    assert manifest["kind"] == "workdir" and {s["name"] for s in manifest["data"]["steps"]} >= {"convert", "llm-engine"}
