"""`vlmbuild.hub.download` driving the real huggingface_hub client against a local fake Hub."""

from __future__ import annotations

import importlib.util
import json
import random

import huggingface_hub.constants
import huggingface_hub.file_download
import numpy as np
import pytest
from safetensors.numpy import save

from fakehub import FakeHub, FakeRepo, route_client_to  # tests/ is on sys.path (no __init__.py there)
from vlmbuild.errors import ConfigError, DownloadError, ToolMissingError
from vlmbuild.hub import HF_MANIFEST_KIND, download
from vlmbuild.manifest import read_manifest
from vlmbuild.recipe import load_recipe

REPO_1B = "OpenGVLab/InternVL2-1B"
QWEN = "Qwen/Qwen2-0.5B-Instruct"
TOKEN = "hf_fake_token_for_tests"


def _repos(seed: int) -> dict[str, FakeRepo]:
    rng = np.random.default_rng(seed)
    weights = save({"language_model.lm_head.weight": rng.standard_normal((8, 4), dtype=np.float32)})
    vocab = {f"tok{i}": i for i in rng.permutation(16).tolist()}
    model = {
        "config.json": json.dumps({"architectures": ["InternVLChatModel"], "seed": seed}).encode(),
        "model.safetensors": weights,
        "vocab.json": json.dumps(vocab).encode(),
        "merges.txt": b"#version: 0.2\nt o\n",
        "tokenizer_config.json": b'{"tokenizer_class": "Qwen2Tokenizer"}',
    }
    tokenizer = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab}}).encode()
    return {REPO_1B: FakeRepo(model, commit="a" * 40), QWEN: FakeRepo({"tokenizer.json": tokenizer}, commit="b" * 40)}


@pytest.fixture
def seed() -> int:
    return random.randrange(2**32)


@pytest.fixture
def hub(monkeypatch, tmp_path, seed):
    with FakeHub(_repos(seed)) as fake:
        route_client_to(fake, monkeypatch, tmp_path / "hub-cache", token=TOKEN)
        yield fake


@pytest.fixture
def recipe():
    return load_recipe("internvl2-1b")


def _assert_one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


def test_internvl2_1b_download_fetches_files_and_tokenizer_fix(hub, recipe, tmp_path, seed):
    model = download(recipe, tmp_path / "work", show_progress=False)

    assert model == tmp_path / "work" / "hf"
    for name, data in hub.repos[REPO_1B].files.items():
        assert (model / name).read_bytes() == data, f"{name} differs (seed {seed})"
    assert (model / "tokenizer.json").read_bytes() == hub.repos[QWEN].files["tokenizer.json"], f"seed {seed}"
    manifest = read_manifest(model, HF_MANIFEST_KIND)
    assert manifest.data["repo"] == REPO_1B and manifest.data["commit"] == "a" * 40
    assert manifest.data["files"] == sorted([*hub.repos[REPO_1B].files, "tokenizer.json"])
    assert len(manifest.data["fixes"]) == 1 and QWEN in manifest.data["fixes"][0]
    paths = hub.paths()
    assert any(p.startswith(f"/api/models/{REPO_1B}") for p in paths), paths
    assert f"/{QWEN}/resolve/main/tokenizer.json" in paths, paths
    no_token = [s.path for s in hub.seen if s.headers.get("authorization") != f"Bearer {TOKEN}"]
    assert not no_token, f"requests without the HF_TOKEN bearer: {no_token}"
    assert not (tmp_path / "work" / ".hf.partial").exists()


def test_cut_transfer_resumes_with_range(hub, recipe, tmp_path, seed, monkeypatch):
    # Small read chunks so the bytes before the cut reach the file (real shards are > 10 MB chunks).
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16)
    monkeypatch.setattr(huggingface_hub.file_download, "DOWNLOAD_CHUNK_SIZE", 16, raising=False)  # hub 0.23
    hub.faults.truncate_once.add("model.safetensors")
    try:
        model = download(recipe, tmp_path, show_progress=False)
    except DownloadError:  # hub 0.23 gives up on a cut body but keeps it; the re-run resumes it
        model = download(recipe, tmp_path, show_progress=False)
    ranged = [s for s in hub.seen if s.method == "GET" and "range" in s.headers]
    assert ranged and ranged[0].path.startswith("/cdn/"), [(s.method, s.path[-30:], s.headers.get("range")) for s in hub.seen]
    assert (model / "model.safetensors").read_bytes() == hub.repos[REPO_1B].files["model.safetensors"], f"seed {seed}"


def test_rerun_and_update_refetch_only_what_changed(hub, recipe, tmp_path, seed):
    download(recipe, tmp_path, show_progress=False)
    download(recipe, tmp_path, show_progress=False)
    names = [*hub.repos[REPO_1B].files, "tokenizer.json"]
    assert {n: hub.gets(n) for n in names} == dict.fromkeys(names, 1)

    # A new upstream commit that changes only config.json.
    repo = hub.repos[REPO_1B]
    repo.commit = "c" * 40
    repo.files["config.json"] = json.dumps({"architectures": ["InternVLChatModel"], "seed": seed + 1}).encode()
    model = download(recipe, tmp_path, show_progress=False)

    assert {n: hub.gets(n) for n in names} == {**dict.fromkeys(names, 1), "config.json": 2}
    assert (model / "config.json").read_bytes() == repo.files["config.json"], f"seed {seed}"
    assert (model / "tokenizer.json").is_file()
    assert read_manifest(model, HF_MANIFEST_KIND).data["commit"] == "c" * 40


def test_failed_download_is_never_complete_and_rerun_resumes(hub, recipe, tmp_path):
    hub.faults.get_status["model.safetensors"] = 500
    with pytest.raises(DownloadError) as err:
        download(recipe, tmp_path, show_progress=False)
    _assert_one_line(err, REPO_1B, "HTTP 500", "HF_ENDPOINT")
    assert not (tmp_path / "hf").exists()
    assert (tmp_path / ".hf.partial" / "config.json").is_file()

    del hub.faults.get_status["model.safetensors"]
    model = download(recipe, tmp_path, show_progress=False)
    assert hub.gets("config.json") == 1, "the re-run fetched a file that had already landed"
    assert (model / "model.safetensors").read_bytes() == hub.repos[REPO_1B].files["model.safetensors"]

    # A failed update leaves the previous complete download as it was.
    hub.repos[REPO_1B].commit = "d" * 40
    hub.repos[REPO_1B].files["model.safetensors"] += b" "
    hub.faults.get_status["model.safetensors"] = 503
    with pytest.raises(DownloadError):
        download(recipe, tmp_path, show_progress=False)
    assert read_manifest(model, HF_MANIFEST_KIND).data["commit"] == "a" * 40


@pytest.mark.parametrize(
    ("repo_id", "gated", "api_status", "words"),
    [
        ("nobody/missing", False, None, ("nobody/missing", "HTTP 404", "HF_TOKEN")),
        (REPO_1B, True, None, ("gated", "HTTP 403", "licence", "HF_TOKEN")),
        (REPO_1B, False, 500, ("HTTP 500", "HF_ENDPOINT")),
    ],
)
def test_hub_errors_are_one_line(hub, recipe, tmp_path, repo_id, gated, api_status, words):
    hub.repos[REPO_1B].gated = gated
    hub.faults.api_status = api_status
    with pytest.raises(DownloadError) as err:
        download(recipe.model_copy(update={"hf_repo": repo_id}), tmp_path, show_progress=False)
    _assert_one_line(err, *words)
    assert not (tmp_path / "hf").exists()


def test_synthetic_recipe_points_to_synth(tmp_path):
    with pytest.raises(ConfigError) as err:
        download(load_recipe("tiny-internvl2-1b"), tmp_path)
    _assert_one_line(err, "vlmbuild synth")


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed")
def test_modelscope_source_needs_the_package(recipe, tmp_path):
    with pytest.raises(ToolMissingError) as err:
        download(recipe, tmp_path, source="modelscope")
    _assert_one_line(err, "pip install modelscope")
