"""Qwen-VL-Chat: the `qwen_vit` encoder and its ONNX export vs an independent reference of
`transformer.visual` (tests/qwen_vl_reference.py, plain torch from model-facts §5.2), and the whole
served stack vs that reference + transformers' Qwen2ForCausalLM generating greedily from inputs_embeds.

Tolerances: the fp32 module and the fp32 ONNX graph within 1e-4 of the reference, relative to max |ref|.
The reference's two classic mistakes (in_proj split in [Q; K; V] blocks, no pos_embed on the resampler
keys) are shown to miss our module by far more than that, so the comparison can catch either.
"""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image
from qwen_vl_reference import ReferenceVisual, QwenTokenizer, generate, make_context, picture_query, preprocess, reference_llm
from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.pipeline import build_workdir
from vlmbuild.recipe import load_recipe
from vlmbuild.serve.runtime import ServeOptions
from vlmbuild.serve.server import BackgroundServer, make_app
from vlmbuild.synth import synth_checkpoint
from vlmbuild.vision.encoder import encoder_for, get_encoder
from vlmbuild.vision.export import OrtGraph, check_onnx, export_onnx

RECIPE = "tiny-qwen-vl-chat"
REL_TOL = 1e-4
MAX_NEW = 12


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def seed() -> int:
    return random.randrange(1 << 30)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, seed):
    root = tmp_path_factory.mktemp("qwen-vl")
    synth_checkpoint(load_recipe(RECIPE), root / "hf", seed=seed)
    return root


@pytest.fixture(scope="module")
def ref_visual(workdir) -> ReferenceVisual:
    return ReferenceVisual(workdir / "hf")


def test_checkpoint_resolves_to_qwen_vit(workdir):
    enc = encoder_for(HfCheckpoint(workdir / "hf"))
    assert enc is get_encoder("qwen_vit") and enc.tokens_per_patch == 256 and enc.image_size == 448
    assert load_recipe(RECIPE).vision == "qwen_vit"


def test_torch_module_matches_reference(workdir, ref_visual, seed):
    tower = get_encoder("qwen_vit").build(HfCheckpoint(workdir / "hf"), torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    for n in (1, 3):
        pixels = torch.randn(n, 3, 448, 448, generator=g)
        with torch.no_grad():
            got = tower(pixels)
        want = ref_visual(pixels)
        assert got.shape == want.shape == (n, 256, 256), f"seed={seed}"
        assert rel_err(got, want) < REL_TOL, f"seed={seed} n={n}: rel err {rel_err(got, want):.2e}"


@pytest.mark.parametrize("mistake", [{"per_head_split": False}, {"key_pos": False}], ids=["qkv-blocks", "no-key-pos"])
def test_reference_mistakes_are_far_outside_tolerance(workdir, seed, mistake):
    tower = get_encoder("qwen_vit").build(HfCheckpoint(workdir / "hf"), torch.float32)
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        err = rel_err(tower(pixels), ReferenceVisual(workdir / "hf", **mistake)(pixels))
    assert err > 100 * REL_TOL, f"seed={seed} {mistake}: a wrong reference is only {err:.2e} away"


def test_onnx_fp32_matches_reference(workdir, ref_visual, seed, tmp_path):
    enc, ckpt = get_encoder("qwen_vit"), HfCheckpoint(workdir / "hf")
    exported = export_onnx(ckpt, enc, tmp_path / "vision.onnx", "float32", opt_batch=2)
    assert exported.input_shape == ["batch", 3, 448, 448] and exported.output_shape == ["batch", 256, 256]
    report = check_onnx(ckpt, enc, exported.onnx, "float32", seed=seed)
    assert report.passed and report.max_rel_error < REL_TOL, f"seed={seed}: {report}"
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(seed + 3))
    err = rel_err(OrtGraph(exported.onnx)(pixels), ref_visual(pixels))
    assert err < REL_TOL, f"seed={seed}: ONNX vs reference rel err {err:.2e}"


# ---- end to end through the OpenAI SDK ------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(workdir, ref_visual):
    build_workdir(load_recipe(RECIPE), workdir, model_dir=workdir / "hf", builder="none")
    app = make_app(workdir, ServeOptions(device="cpu"))
    with BackgroundServer(app) as url:
        yield {"client": OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), "visual": ref_visual,
               "llm": reference_llm(workdir / "hf"), "tok": QwenTokenizer(workdir / "hf")}


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(200, 900)), int(rng.integers(200, 900))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _reference(stack, images: list[Image.Image], question: str) -> tuple[str, int, int]:
    tok = stack["tok"]
    ids = make_context(tok, picture_query(len(images), question))
    # make_context tokenizes role and content apart; the whole chatml string must give the same ids.
    sys_block = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert ids == tok.encode(f"{sys_block}<|im_start|>user\n{picture_query(len(images), question)}<|im_end|>\n<|im_start|>assistant\n")
    feats = stack["visual"](torch.cat([preprocess(im) for im in images])) if images else None
    new = generate(stack["llm"], tok, ids, feats, MAX_NEW)
    return tok.decode(new), len(ids), len(new)


def _ask(stack, content: list[dict], stream: bool = False) -> tuple[str, object]:
    kw = dict(model=RECIPE, messages=[{"role": "user", "content": content}], max_tokens=MAX_NEW, temperature=0)
    if not stream:
        r = stack["client"].chat.completions.create(**kw)
        return r.choices[0].message.content, r.usage
    chunks = list(stack["client"].chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage


def test_one_image_matches_reference(stack):
    seed = random.randrange(1 << 30)
    img, question = _image(seed), "What is in the picture?"
    want, n_prompt, n_new = _reference(stack, [img], question)
    content = [{"type": "image_url", "image_url": {"url": _data_url(img)}}, {"type": "text", "text": question}]
    text, usage = _ask(stack, content)
    assert (text, usage.prompt_tokens, usage.completion_tokens) == (want, n_prompt, n_new), f"seed {seed}"
    s_text, s_usage = _ask(stack, content, stream=True)
    assert (s_text, s_usage.prompt_tokens, s_usage.completion_tokens) == (want, n_prompt, n_new), f"seed {seed}"


def test_two_images_match_reference(stack):
    seed = random.randrange(1 << 30)
    images, question = [_image(seed), _image(seed + 1)], "What differs between them?"
    want, n_prompt, n_new = _reference(stack, images, question)
    content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images] + [{"type": "text", "text": question}]
    text, usage = _ask(stack, content)
    assert (text, usage.prompt_tokens, usage.completion_tokens) == (want, n_prompt, n_new), f"seed {seed}"
    assert n_prompt > 2 * 258


def test_text_only_matches_reference(stack):
    want, n_prompt, n_new = _reference(stack, [], "Hello, who are you?")
    text, usage = _ask(stack, [{"type": "text", "text": "Hello, who are you?"}])
    assert (text, usage.prompt_tokens, usage.completion_tokens) == (want, n_prompt, n_new)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_onnx_half_precision_vs_reference(workdir, ref_visual, seed, tmp_path, dtype):
    """fp16 runs as exported, bf16 as its exact fp32 upcast (export.py); both vs the fp32 reference at the encoder's tolerance."""
    enc, ckpt = get_encoder("qwen_vit"), HfCheckpoint(workdir / "hf")
    exported = export_onnx(ckpt, enc, tmp_path / "vision.onnx", dtype, opt_batch=1)
    assert check_onnx(ckpt, enc, exported.onnx, dtype, seed=seed, batch_sizes=(1,)).passed
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(seed + 4))
    err = rel_err(OrtGraph(exported.onnx)(pixels), ref_visual(pixels))
    assert err < enc.tolerance_for(dtype), f"seed={seed} {dtype}: rel err {err:.2e}"
