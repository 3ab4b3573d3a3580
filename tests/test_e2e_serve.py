"""End to end: `vlmbuild serve` answers through the real `openai` SDK exactly as transformers'
InternVLForConditionalGeneration.generate does (greedy), prompt_tokens included, for each request
shape of the reference guide (one image, local file, two images, multi-turn, six video frames, text)
and for every tiny InternVL2 layout: Qwen2, InternLM2 and Phi-3 LLMs, InternViT-300M and -6B."""

from __future__ import annotations

import base64
import io
import os
import random

import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image
from internvl_reference import STOPS, chat_prompt, image_tokens, load_reference, pixel_values, reference_tokenizer
from vlmbuild.pipeline import build_workdir
from vlmbuild.recipe import load_recipe
from vlmbuild.serve.runtime import ServeOptions
from vlmbuild.serve.server import BackgroundServer, make_app
from vlmbuild.synth import synth_checkpoint

MAX_NEW = 12
RECIPES = ["tiny-internvl2-1b", "tiny-internvl2-2b", "tiny-internvl2-4b", "tiny-internvl2-26b"]


@pytest.fixture(scope="module", params=RECIPES)
def stack(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    recipe = load_recipe(request.param)
    synth_checkpoint(recipe, root / "work" / "hf", seed=random.randrange(1 << 20))
    build_workdir(recipe, root / "work", builder="none")
    media = root / "media"
    media.mkdir()
    # VLMBUILD_TEST_DEVICE=cuda runs the served side on a GPU (the reference stays on the CPU).
    device = os.environ.get("VLMBUILD_TEST_DEVICE", "cpu")
    app = make_app(root / "work", ServeOptions(device=device, allowed_local_media_path=media))
    tok = reference_tokenizer(root / "work" / "hf")
    ref = load_reference(root / "work" / "hf", tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    with BackgroundServer(app) as url:
        yield {"client": OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), "ref": ref, "tok": tok, "media": media,
               "model": recipe.name, "template": recipe.template}


def prompt(stack, turns, **kw) -> str:
    return chat_prompt(stack["template"], turns, **kw)


def _image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(200, 1400)), int(rng.integers(200, 1000)))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _reference(stack, prompt: str, images: list[Image.Image], max_patches: int = 12) -> tuple[str, int, int]:
    tok, ref = stack["tok"], stack["ref"]
    kwargs = {}
    if images:
        pv, tiles = pixel_values(images, max_patches=max_patches)
        for n in tiles:  # expand each <image> as InternVL's chat() does
            prompt = prompt.replace("<image>", image_tokens(n), 1)
        kwargs["pixel_values"] = pv
    ids = torch.tensor([tok.encode(prompt)])
    eos = [tok.convert_tokens_to_ids(t) for t in STOPS[stack["template"]]]
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos[0], **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), ids.shape[1], len(new)


def _ask(stack, messages, stream=False):
    kw = dict(model=stack["model"], messages=messages, max_tokens=MAX_NEW, temperature=0)
    if not stream:
        r = stack["client"].chat.completions.create(**kw)
        return r.choices[0].message.content, r.usage
    chunks = list(stack["client"].chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def test_single_image_matches_transformers_streaming_and_not(stack):
    seed = random.randrange(1 << 30)
    img = _image(seed)
    question = "<image>\nWhat is in the picture?"
    want, n_prompt, n_new = _reference(stack, prompt(stack, [(question, None)]), [img])
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(img)}},
                                         {"type": "text", "text": question}]}]
    text, usage = _ask(stack, msgs)
    assert text == want, f"seed {seed}"
    assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, n_new), f"seed {seed}"
    s_text, s_usage = _ask(stack, msgs, stream=True)
    assert s_text == text and s_usage.prompt_tokens == n_prompt and s_usage.completion_tokens == usage.completion_tokens


def test_image_without_placeholder_gets_one_prepended(stack):
    img = _image(random.randrange(1 << 30), (448, 448))
    want, n_prompt, n_new = _reference(stack, prompt(stack, [("<image>\nDescribe it.", None)]), [img])
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                         {"type": "image_url", "image_url": {"url": _data_url(img)}}]}]
    text, usage = _ask(stack, msgs)
    assert (text, usage.prompt_tokens) == (want, n_prompt)


def test_local_file_under_allowed_path(stack):
    img = _image(random.randrange(1 << 30))
    path = stack["media"] / "local.png"
    img.save(path)
    want, n_prompt, n_new = _reference(stack, prompt(stack, [("<image>\nWhat is this?", None)]), [img])
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{path}"}},
                                         {"type": "text", "text": "<image>\nWhat is this?"}]}]
    assert _ask(stack, msgs)[0] == want


def test_two_images_and_multi_turn(stack):
    a, b = _image(random.randrange(1 << 30)), _image(random.randrange(1 << 30))
    q1 = "Image-1: <image>\nImage-2: <image>\nWhat differs?"
    first, _, _ = _reference(stack, prompt(stack, [(q1, None)]), [a, b])
    msgs = [{"role": "user", "content": [{"type": "text", "text": q1}, {"type": "image_url", "image_url": {"url": _data_url(a)}},
                                         {"type": "image_url", "image_url": {"url": _data_url(b)}}]}]
    assert _ask(stack, msgs)[0] == first
    # second turn keeps the earlier images; the assistant text is stripped as chat() stores it
    q2 = "And the second one?"
    want, n_prompt, n_new = _reference(stack, prompt(stack, [(q1, first.strip()), (q2, None)]), [a, b])
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": q2}]
    text, usage = _ask(stack, msgs)
    assert (text, usage.prompt_tokens) == (want, n_prompt)


def test_six_video_frames_one_tile_each(stack):
    frames = [_image(random.randrange(1 << 30)) for _ in range(6)]
    question = "".join(f"Frame{i + 1}: <image>\n" for i in range(6)) + "What happens?"
    want, n_prompt, n_new = _reference(stack, prompt(stack, [(question, None)]), frames, max_patches=1)
    content = [{"type": "text", "text": question}] + [{"type": "image_url", "image_url": {"url": _data_url(f)}} for f in frames]
    text, usage = _ask(stack, [{"role": "user", "content": content}])
    assert (text, usage.prompt_tokens) == (want, n_prompt)
    assert n_prompt > 6 * 256


def test_plain_text(stack):
    want, n_prompt, n_new = _reference(stack, prompt(stack, [("Hello, who are you?", None)], system="You are terse."), [])
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, who are you?"}]
    text, usage = _ask(stack, msgs)
    assert (text, usage.prompt_tokens) == (want, n_prompt)


def test_two_large_images_beyond_4096_tokens(stack):
    """2 × 13 tiles ≈ 6.7k prompt tokens: past Phi-3's original 4096 context, so long-rope factors apply."""
    big = [_image(random.randrange(1 << 30), (1792, 1344)) for _ in range(2)]  # a 4x3 grid + thumbnail each
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    want, n_prompt, n_new = _reference(stack, prompt(stack, [(question, None)]), big)
    content = [{"type": "text", "text": question}] + [{"type": "image_url", "image_url": {"url": _data_url(b)}} for b in big]
    text, usage = _ask(stack, [{"role": "user", "content": content}])
    assert n_prompt > 4096
    assert (text, usage.prompt_tokens, usage.completion_tokens) == (want, n_prompt, n_new)
