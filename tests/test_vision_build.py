"""Vision engine builds (TensorRT-RTX, CPU-only here), `build_vit` end to end, and the vision runtimes.

Numbers are compared with transformers' InternVLModel (see test_vision_model.py for the reference and
its tolerances); the tiny checkpoints are written by the same helper.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_vision_model import D, hf_reference, rel_err, write_internvl_checkpoint

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import ConfigError, ExportError, ToolMissingError, UnsupportedError
from vlmbuild.manifest import read_manifest
from vlmbuild.vision import pipeline
from vlmbuild.vision.build import Profile, build_engine, resolve_builder
from vlmbuild.vision.encoder import get_encoder
from vlmbuild.vision.export import export_onnx
from vlmbuild.vision.pipeline import build_vit
from vlmbuild.vision.runtime import check_pixels, choose_backend, load_vision_runtime, torch_dtype

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None or importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX Python bindings are not installed")


@pytest.fixture(scope="module")
def seed() -> int:
    return random.randrange(2**31)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, seed) -> Path:
    return write_internvl_checkpoint(tmp_path_factory.mktemp("ckpt"), "6b", seed)


@needs_rtx
def test_tensorrt_rtx_builds_engine_from_external_data_onnx(model_dir, tmp_path):
    onnx_path = export_onnx(HfCheckpoint(model_dir), get_encoder("intern_vit"), tmp_path / "vision.onnx", "float16",
                            opt_batch=2, external_data=True).onnx
    res = build_engine(onnx_path, tmp_path / "vision.engine", 1, 2, 4, "float16", builder="tensorrt-rtx")
    assert res.builder == "tensorrt-rtx" and res.strongly_typed and res.profile == Profile(1, 2, 4)
    data = (tmp_path / "vision.engine").read_bytes()
    assert len(data) == res.size_bytes > 1000
    if torch.cuda.is_available():  # deserialising needs a GPU; there, the profile must read back
        _, trt = resolve_builder("tensorrt-rtx")
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        assert [tuple(s) for s in engine.get_tensor_profile_shape("input", 0)] == [(b, 3, 448, 448) for b in (1, 2, 4)]


@needs_rtx
def test_parser_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(ExportError, match="ONNX parser rejected") as err:
        build_engine(bad, tmp_path / "e.engine", 1, 1, 1, "float16", builder="tensorrt-rtx")
    assert "\n" not in str(err.value) and not (tmp_path / "e.engine").exists()


def test_builder_choices_and_profile_validation(tmp_path):
    with pytest.raises(ConfigError, match="min_batch <= opt_batch"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.engine", 2, 1, 4, "float16", builder="tensorrt-rtx")
    with pytest.raises(UnsupportedError, match="auto, tensorrt, tensorrt-rtx, none"):
        resolve_builder("tensorrt-llm")
    assert build_engine(tmp_path / "x.onnx", tmp_path / "x.engine", 1, 1, 1, "float16", builder="none") is None
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(ToolMissingError, match="pip|install"):
            resolve_builder("tensorrt")


@needs_rtx
def test_build_vit_end_to_end(model_dir, tmp_path, capsys, seed):
    out = tmp_path / "vision"
    res = build_vit(model_dir, out, dtype="float16", min_batch=1, opt_batch=2, max_batch=3, builder="auto")
    assert "✓ ONNX check" in capsys.readouterr().err
    m = read_manifest(out, "vision").data
    assert m["encoder"] == "intern_vit" and m["dtype"] == "float16" and m["model_dir"] == str(model_dir.resolve())
    assert m["input_shape"] == ["batch", 3, 448, 448] and m["output_shape"] == ["batch", 256, D] and m["hidden_size"] == D
    assert m["profile"] == {"min": 1, "opt": 2, "max": 3} and m["onnx"] == "vision.onnx" and m["onnx_data"] is None
    assert m["engine"] == "vision.engine" and m["builder"]["name"] == "tensorrt-rtx" and m["engine_skipped"] is None
    assert m["check"]["batch_sizes"] == [1, 3] and m["check"]["max_rel_error"] <= m["check"]["tolerance"] == 2e-2
    assert m["mean"] == [0.485, 0.456, 0.406] and m["tokens_per_patch"] == 256
    assert res.engine_path == out / "vision.engine" and res.engine_path.stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "vision.engine", "vision.onnx"]
    # Engine present, runtime importable, no CUDA here: auto must fall back to onnxruntime.
    rt = load_vision_runtime(out, backend="auto")
    assert rt.backend == ("tensorrt" if torch.cuda.is_available() else "onnxruntime")


def test_failure_mid_way_leaves_nothing(model_dir, tmp_path, monkeypatch):
    def broken_builder(*args, **kwargs):
        raise ExportError("builder exploded")

    monkeypatch.setattr(pipeline, "resolve_builder", lambda name: ("tensorrt-rtx", None))
    monkeypatch.setattr(pipeline, "build_engine", broken_builder)
    out = tmp_path / "vision"
    with pytest.raises(ExportError, match="builder exploded"):
        build_vit(model_dir, out, dtype="float32", min_batch=1, opt_batch=1, max_batch=2, builder="auto")
    assert list(tmp_path.iterdir()) == []
    # An earlier good artifact survives a failed rebuild untouched.
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ExportError):
        build_vit(model_dir, out, dtype="float32", min_batch=1, opt_batch=1, max_batch=2, builder="tensorrt-rtx")
    assert [p.name for p in tmp_path.iterdir()] == ["vision"] and (out / "manifest.json").read_text() == "{}"


def test_runtimes_chunk_and_match_transformers(model_dir, tmp_path, seed):
    """bf16 build without engine; onnxruntime and torch backends on 5 tiles through max_batch 2 (3 chunks)."""
    out = tmp_path / "vision"
    res = build_vit(model_dir, out, dtype="bfloat16", min_batch=1, opt_batch=1, max_batch=2, builder="none")
    assert res.engine_path is None and res.skipped_reason == "builder none"
    assert json.loads((out / "manifest.json").read_text())["data"]["check"]["graph"] == "bf16 weights, fp32 upcast"
    pixels = torch.randn(5, 3, 448, 448, generator=torch.Generator().manual_seed(seed))
    want = hf_reference(model_dir)(pixels)
    ort_rt = load_vision_runtime(out)  # auto: no engine → onnxruntime
    assert (ort_rt.backend, ort_rt.max_batch, ort_rt.hidden_size) == ("onnxruntime", 2, D)
    got = ort_rt(pixels)
    assert got.dtype == torch.float32 and got.shape == (5, 256, D)
    assert rel_err(got, want) < get_encoder("intern_vit").tolerance_for("bfloat16"), f"seed={seed}"
    torch_rt = load_vision_runtime(out, backend="torch")  # model_dir from the manifest; fp32 on CPU
    assert rel_err(torch_rt(pixels), want) < 1e-4, f"seed={seed}"
    assert ort_rt(pixels[:0]).shape == (0, 256, D)
    with pytest.raises(UnsupportedError, match=r"\[N, 3, 448, 448\]"):
        ort_rt(pixels[:, :, :224])


def test_backend_choice_and_engine_dtypes():
    assert choose_backend("auto", True, True, True)[0] == "tensorrt"
    for flags in [(False, True, True), (True, False, True)]:  # engine or runtime missing on a GPU
        assert choose_backend("auto", *flags, ort_cuda=True)[0] == "onnxruntime", flags
        assert choose_backend("auto", *flags, ort_cuda=False)[0] == "torch", flags  # not onnxruntime on the CPU
    assert choose_backend("auto", True, True, False)[0] == "onnxruntime"  # CPU device
    assert choose_backend("torch", False, False, False) == ("torch", "requested")
    with pytest.raises(ConfigError):
        choose_backend("tensorrt-llm", True, True, True)
    assert [torch_dtype(SimpleNamespace(name=n)) for n in ("FLOAT", "HALF", "BF16")] == [torch.float32, torch.float16, torch.bfloat16]
    with pytest.raises(UnsupportedError, match="INT8"):
        torch_dtype(SimpleNamespace(name="INT8"))
    if HAS_RTX:  # the real enum spells them the same way
        _, trt = resolve_builder("tensorrt-rtx")
        assert torch_dtype(trt.DataType.HALF) == torch.float16 and torch_dtype(trt.DataType.BF16) == torch.bfloat16
    check_pixels((2, 3, 448, 448), 448)
    with pytest.raises(UnsupportedError):
        check_pixels((3, 448, 448), 448)
