"""InternViT tower (300M and 6B shapes) and its ONNX export vs transformers' native InternVL.

Reference: `transformers.InternVLModel.get_image_features` (vision tower + pixel shuffle + projector),
loaded with the tiny checkpoint's tensors renamed by the rules of HF's `convert_internvl_weights_to_hf.py`
(docs/model-facts.md §7). Tolerances: fp32 module 1e-4 relative to max |ref|; ONNX fp32 the same.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import save_file

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import CheckpointError, ExportError, UnsupportedError
from vlmbuild.vision.encoder import ENCODERS, encoder_for, get_encoder
from vlmbuild.vision.export import OrtGraph, check_onnx, export_onnx

# Tiny shapes: vision hidden C, heads, layers, MLP width, LLM hidden D.
C, HEADS, LAYERS, INTER, D = 32, 2, 2, 48, 24
SHAPES = {
    "300m": dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
    "6b": dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
}
REL_TOL = 1e-4


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _vision_tensors(g: torch.Generator, shape: str, hidden_size: int) -> dict[str, torch.Tensor]:
    """Random `vision_model.*` / `mlp1.*` tensors in the original InternVL2 layout (model-facts §1.3)."""
    opts = SHAPES[shape]

    def rnd(*size: int, scale: float = 0.2, base: float = 0.0) -> torch.Tensor:
        return base + scale * torch.randn(*size, generator=g)

    def mat(rows: int, cols: int) -> torch.Tensor:  # fan-in scaling keeps activations O(1) at any width
        return rnd(rows, cols, scale=cols**-0.5)

    t = {
        "vision_model.embeddings.class_embedding": rnd(1, 1, C),
        "vision_model.embeddings.patch_embedding.weight": rnd(C, 3, 14, 14, scale=588**-0.5),
        "vision_model.embeddings.patch_embedding.bias": rnd(C),
        "vision_model.embeddings.position_embedding": rnd(1, 32 * 32 + 1, C),
    }
    for i in range(LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        t[p + "attn.qkv.weight"] = mat(3 * C, C)
        if opts["qkv_bias"]:
            t[p + "attn.qkv.bias"] = rnd(3 * C)
        if opts["qk_normalization"]:
            t[p + "attn.q_norm.weight"] = rnd(C, base=1.0)
            t[p + "attn.k_norm.weight"] = rnd(C, base=1.0)
        t |= {p + "attn.proj.weight": mat(C, C), p + "attn.proj.bias": rnd(C)}
        t |= {p + "mlp.fc1.weight": mat(INTER, C), p + "mlp.fc1.bias": rnd(INTER)}
        t |= {p + "mlp.fc2.weight": mat(C, INTER), p + "mlp.fc2.bias": rnd(C)}
        for norm in ("norm1", "norm2"):
            t[p + f"{norm}.weight"] = rnd(C, base=1.0)
            if opts["norm_type"] == "layer_norm":
                t[p + f"{norm}.bias"] = rnd(C)
        t |= {p + "ls1": rnd(C, scale=0.3, base=0.5), p + "ls2": rnd(C, scale=0.3, base=0.8)}
    t |= {"mlp1.0.weight": rnd(4 * C, base=1.0), "mlp1.0.bias": rnd(4 * C)}
    t |= {"mlp1.1.weight": mat(hidden_size, 4 * C), "mlp1.1.bias": rnd(hidden_size)}
    t |= {"mlp1.3.weight": mat(hidden_size, hidden_size), "mlp1.3.bias": rnd(hidden_size)}
    return t


def write_internvl_checkpoint(path: Path, shape: str, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny InternVL2 checkpoint directory: config.json + model.safetensors (vision, mlp1, one LLM tensor)."""
    path.mkdir(parents=True, exist_ok=True)
    vision_config = dict(
        architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=C, num_attention_heads=HEADS,
        num_hidden_layers=LAYERS, intermediate_size=INTER, hidden_act="gelu", layer_norm_eps=1e-6,
        image_size=448, patch_size=14, num_channels=3, use_flash_attn=False, **SHAPES[shape],
    )
    config = dict(
        architectures=["InternVLChatModel"], model_type="internvl_chat", template="internlm2-chat", select_layer=-1,
        force_image_size=448, downsample_ratio=0.5, ps_version="v2", dynamic_image_size=True, use_thumbnail=True,
        max_dynamic_patch=12, vision_config=vision_config,
        llm_config=dict(architectures=["InternLM2ForCausalLM"], hidden_size=D, num_hidden_layers=1, vocab_size=64),
    )
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    tensors = _vision_tensors(g, shape, D) | {"language_model.output.weight": torch.randn(64, D, generator=g)}
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


_RENAMES = [  # convert_internvl_weights_to_hf.py order, applied to the whole key
    (r"^vision_model\.", "vision_tower."), (r"\.layers\.", ".layer."), (r"class_embedding", "cls_token"),
    (r"position_embedding", "position_embeddings"), (r"patch_embedding", "patch_embeddings.projection"),
    (r"\.ls(\d+)", r".lambda_\1"), (r"attn\.proj", "attention.projection_layer"), (r"\.attn\.", ".attention."),
    (r"norm1", "layernorm_before"), (r"norm2", "layernorm_after"),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."), (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
]


def hf_reference(model_dir: Path):
    """transformers' InternVLModel with the original tensors renamed, as a pixels → [N, 256, D] callable."""
    model = hf_model(model_dir)

    def features(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return features


def hf_model(model_dir: Path):
    from transformers import InternVLConfig, InternVLModel, InternVLVisionConfig

    raw = json.loads((model_dir / "config.json").read_text())
    v = raw["vision_config"]
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"], attention_bias=v["qkv_bias"], use_qk_norm=v["qk_normalization"],
        norm_type=v["norm_type"], layer_norm_eps=v["layer_norm_eps"], image_size=448, patch_size=14,
    )
    text = dict(model_type="qwen2", hidden_size=D, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, vocab_size=64)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=raw["downsample_ratio"])
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = InternVLModel(config).eval()
    state = {}
    for name, tensor in HfCheckpoint(model_dir).iter_prefix("", strip=False):
        if name.startswith("language_model."):
            continue
        for pat, rep in _RENAMES:
            name = re.sub(pat, rep, name)
        if ".attention.qkv." in name:  # rows [Q; K; V] → three Linears
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.float().chunk(3)):
                state[name.replace("qkv", part)] = chunk
        else:
            state[name] = tensor.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.startswith("language_model.") for m in missing), missing
    return model


@pytest.fixture(scope="module")
def seed() -> int:
    return random.randrange(2**31)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory, seed) -> Path:
    # The directory is named after the shape (tests read it back from `checkpoint.name`).
    return write_internvl_checkpoint(tmp_path_factory.mktemp(request.param, numbered=False), request.param, seed)


TESTED_ENCODERS = {"intern_vit", "qwen_vit"}  # qwen_vit: tests/test_qwen_vl.py


def test_every_registered_encoder_has_a_reference_test():
    untested = set(ENCODERS) - TESTED_ENCODERS
    assert not untested, f"encoders without a reference test: {sorted(untested)}"


def test_registry_and_lookup(checkpoint):
    assert encoder_for(HfCheckpoint(checkpoint)) is get_encoder("intern_vit")
    with pytest.raises(UnsupportedError, match="intern_vit"):
        get_encoder("nope")


def test_torch_module_matches_transformers(checkpoint, seed):
    enc = get_encoder("intern_vit")
    tower = enc.build(HfCheckpoint(checkpoint), torch.float32)
    ref = hf_reference(checkpoint)
    g = torch.Generator().manual_seed(seed + 1)
    for n in (1, 3):
        pixels = torch.randn(n, 3, 448, 448, generator=g)
        with torch.no_grad():
            got = tower(pixels)
        want = ref(pixels)
        assert got.shape == (n, enc.tokens_per_patch, D) == want.shape
        assert rel_err(got, want) < REL_TOL, f"seed={seed} n={n} {checkpoint.name}: rel err {rel_err(got, want):.2e}"


def test_onnx_fp32_matches_transformers(checkpoint, seed, tmp_path):
    import onnxruntime as ort

    enc = get_encoder("intern_vit")
    ckpt = HfCheckpoint(checkpoint)
    onnx_path = export_onnx(ckpt, enc, tmp_path / "vision.onnx", "float32", opt_batch=2).onnx
    report = check_onnx(ckpt, enc, onnx_path, "float32", seed=seed)
    assert report.max_rel_error < REL_TOL and report.batch_sizes == (1, 3), f"seed={seed}: {report}"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = hf_reference(checkpoint)
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(seed + 2))
    (got,) = session.run(None, {"input": pixels.numpy()})
    assert rel_err(torch.from_numpy(got), ref(pixels)) < REL_TOL, f"seed={seed} {checkpoint.name}"


def test_bf16_checkpoint_loads_and_casts(tmp_path, seed):
    model_dir = write_internvl_checkpoint(tmp_path / "bf16", "300m", seed, dtype=torch.bfloat16)
    tower = get_encoder("intern_vit").build(HfCheckpoint(model_dir), torch.float32)
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert rel_err(tower(pixels), hf_reference(model_dir)(pixels)) < REL_TOL, f"seed={seed}"


def test_bad_checkpoints_fail_loudly(tmp_path, seed):
    model_dir = write_internvl_checkpoint(tmp_path / "m", "6b", seed)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["vision_config"]["qk_normalization"] = False  # q_norm/k_norm tensors become unexpected
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected vision_model.encoder.layers.0.attn.k_norm.weight"):
        get_encoder("intern_vit").build(HfCheckpoint(model_dir), torch.float32)
    cfg["ps_version"] = "v1"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="ps_version"):
        get_encoder("intern_vit").build(HfCheckpoint(model_dir), torch.float32)


def test_onnx_check_rejects_a_wrong_graph(checkpoint, seed, tmp_path):
    """The check must fail when the graph and the module disagree: export one checkpoint, check against another."""
    enc = get_encoder("intern_vit")
    onnx_path = export_onnx(HfCheckpoint(checkpoint), enc, tmp_path / "vision.onnx", "float32", opt_batch=1).onnx
    other = write_internvl_checkpoint(tmp_path / "other", checkpoint.name, seed + 7)
    with pytest.raises(ExportError, match="max relative error"):
        check_onnx(HfCheckpoint(other), enc, onnx_path, "float32", seed=seed)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_onnx_half_precision_vs_transformers(checkpoint, seed, tmp_path, dtype):
    """fp16 runs as exported; bf16 runs upcast (exact weights). Both vs the fp32 reference at the dtype's tolerance.
    The bf16 export also exercises the single external-data file layout used past 2 GiB."""
    enc = get_encoder("intern_vit")
    ckpt = HfCheckpoint(checkpoint)
    exported = export_onnx(ckpt, enc, tmp_path / "vision.onnx", dtype, opt_batch=2, external_data=dtype == "bfloat16")
    if dtype == "bfloat16":
        assert exported.data == tmp_path / "vision.onnx.data"
        header = onnx.load(str(exported.onnx), load_external_data=False)
        pos = next(t for t in header.graph.initializer if t.name == "vision_model.embeddings.position_embedding")
        assert pos.data_location == onnx.TensorProto.EXTERNAL and pos.external_data[0].value == "vision.onnx.data"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert exported.input_shape == ["batch", 3, 448, 448] and exported.output_shape == ["batch", 256, D]
    report = check_onnx(ckpt, enc, exported.onnx, dtype, seed=seed)
    assert report.passed and report.graph == ("exported" if dtype == "float16" else "bf16 weights, fp32 upcast"), f"seed={seed}: {report}"
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(seed + 3))
    err = rel_err(OrtGraph(exported.onnx)(pixels), hf_reference(checkpoint)(pixels))
    assert err < enc.tolerance_for(dtype), f"seed={seed} {checkpoint.name} {dtype}: rel err {err:.2e}"


def test_select_layer_takes_an_earlier_hidden_state(tmp_path, seed):
    """select_layer -2: hidden_states[-2] of transformers' vision tower → its pixel_shuffle → its projector."""
    model_dir = write_internvl_checkpoint(tmp_path / "m", "300m", seed)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(cfg | {"select_layer": -2}))
    tower = get_encoder("intern_vit").build(HfCheckpoint(model_dir), torch.float32)
    model = hf_model(model_dir)
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        want = model.multi_modal_projector(model.pixel_shuffle(hidden.reshape(2, 32, 32, C)).reshape(2, 256, 4 * C))
        got = tower(pixels)
    assert rel_err(got, want) < REL_TOL, f"seed={seed}"
    assert rel_err(got, hf_reference(model_dir)(pixels)) > 1e-2  # and it is not the last layer's output
