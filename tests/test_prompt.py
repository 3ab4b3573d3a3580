"""Prompt rendering against the strings the official code builds, written out literally here from
docs/model-facts.md §4 (InternVL `conversation.py` + `chat()`) and §5.5 (Qwen `make_context`), and
fake-id tokenization of the segments against tokenizing `chat()`'s whole string."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from vlmbuild.errors import RequestError
from vlmbuild.recipe import load_recipe, recipe_names
from vlmbuild.serve.prompt import IMAGE_STYLES, ImageSlot, build_prompt, image_refs
from vlmbuild.serve.protocol import ChatMessage
from vlmbuild.serve.templates import TEMPLATES
from vlmbuild.synth.qwen2 import write_tokenizer as write_qwen2_tokenizer

SYS = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SEED = random.randrange(2**32)
RNG = random.Random(SEED)


def msgs(*items) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in items]


def img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def txt(text: str) -> dict:
    return {"type": "text", "text": text}


def ctx(tiles: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * 256 * tiles + "</img>"


@pytest.mark.parametrize("template", ["internlm2-chat", "Hermes-2"])
@pytest.mark.parametrize("question", ["Describe the image.", "<image>\nDescribe the image."])
def test_single_image_matches_internvl_chat(template, question):
    tiles = RNG.randint(1, 13)
    prompt = build_prompt(msgs({"role": "user", "content": [txt(question), img("https://x/a.jpg")]}), template, None, [tiles])
    # chat(): '<image>\n' prepended when absent, then replaced by <img><IMG_CONTEXT>*256*tiles</img>.
    expected = (
        f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{ctx(tiles)}\nDescribe the image.<|im_end|><|im_start|>assistant\n"
    )
    assert prompt.text() == expected, f"seed {SEED}"
    assert prompt.slots == (ImageSlot(0, 256 * tiles, 0),) and prompt.image_tokens == 256 * tiles
    assert [r.url for r in prompt.images] == ["https://x/a.jpg"]


def test_segments_with_fake_ids_equal_tokenized_chat_string(tmp_path):
    """Hermes-2 with the tiny InternVL2-1B tokenizer (synth's vocab.json + merges.txt, read by
    transformers' Qwen2Tokenizer): ids from segments + fake ids == ids of chat()'s string with each
    `<IMG_CONTEXT>` replaced by vocab + k, and nothing else."""
    write_qwen2_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    vocab, context_id = len(tok), tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    tiles = [RNG.randint(1, 13), RNG.randint(1, 13)]
    messages = msgs(
        {"role": "system", "content": "Réponds en une phrase."},
        {"role": "user", "content": [txt("Image-1: <image>\nImage-2: <image>\nWhat is in it?"), img("a"), img("b")]},
    )
    prompt = build_prompt(messages, "Hermes-2", None, tiles)

    reference, k = [], 0
    for i in tok(prompt.text(), add_special_tokens=False).input_ids:
        reference.append(vocab + k if i == context_id else i)
        k += i == context_id
    got = []
    for part in prompt.parts:
        if isinstance(part, str):
            got += tok(part, add_special_tokens=False).input_ids
        else:
            got += range(vocab + part.offset, vocab + part.offset + part.n_tokens)
    assert got == reference, f"seed {SEED}, tiles {tiles}"
    assert k == 256 * sum(tiles) and context_id not in got


def test_two_images_in_one_message():
    tiles = [RNG.randint(1, 13), RNG.randint(1, 13)]
    prompt = build_prompt(msgs({"role": "user", "content": [img("a"), img("b"), txt("Image-1: <image>\nImage-2: <image>\nCompare.")]}), "internlm2-chat", None, tiles)
    expected = f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\nImage-1: {ctx(tiles[0])}\nImage-2: {ctx(tiles[1])}\nCompare.<|im_end|><|im_start|>assistant\n"
    assert prompt.text() == expected, f"seed {SEED}"
    assert prompt.slots == (ImageSlot(0, 256 * tiles[0], 0), ImageSlot(1, 256 * tiles[1], 256 * tiles[0]))


def test_multi_turn_keeps_earlier_images_and_strips_answers():
    messages = msgs(
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [img("a"), txt("<image>\nWhat is it?")]},
        {"role": "assistant", "content": " A cat. \n"},
        {"role": "user", "content": [txt("And this? <image>"), img("b")]},
    )
    assert [r.url for r in image_refs(messages, "internvl")] == ["a", "b"]
    prompt = build_prompt(messages, "internlm2-chat", "internvl", [3, 1])
    expected = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>"
        f"<|im_start|>user\n{ctx(3)}\nWhat is it?<|im_end|><|im_start|>assistant\nA cat.<|im_end|>"
        f"<|im_start|>user\nAnd this? {ctx(1)}<|im_end|><|im_start|>assistant\n"
    )
    assert prompt.text() == expected


def test_six_video_frames_are_one_tile_each():
    text = "".join(f"Frame{i + 1}: <image>\n" for i in range(6)) + "What happens?"
    messages = msgs({"role": "user", "content": [txt(text)] + [img(f"f{i}") for i in range(6)]})
    refs = image_refs(messages, "internvl")
    assert [r.url for r in refs] == [f"f{i}" for i in range(6)] and all(r.video_frame for r in refs)
    prompt = build_prompt(messages, "internlm2-chat", None, [1] * 6)
    frames = "".join(f"Frame{i + 1}: {ctx(1)}\n" for i in range(6))
    assert prompt.text() == f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{frames}What happens?<|im_end|><|im_start|>assistant\n"
    assert not any(r.video_frame for r in image_refs(msgs({"role": "user", "content": [img("a"), txt("Image-1: <image>")]}), "internvl"))


@pytest.mark.parametrize(
    "content, words",
    [
        ([img("a"), img("b"), txt("Compare <image>")], "messages[0] has 1 <image> placeholder(s) but 2 image(s)"),
        ([img("a"), img("b"), txt("Compare")], "messages[0] has 0 <image> placeholder(s) but 2 image(s)"),
        ([txt("What is <image>?")], "messages[0] has 1 <image> placeholder(s) but 0 image(s)"),
    ],
)
def test_placeholder_count_mismatch_is_a_request_error(content, words):
    with pytest.raises(RequestError) as info:
        image_refs(msgs({"role": "user", "content": content}), "internvl")
    assert words in str(info.value) and info.value.http_status == 400


def test_request_level_errors():
    cases = [
        (msgs({"role": "user", "content": "hi"}, {"role": "system", "content": "late"}), "only accepted as the first message"),
        (msgs({"role": "user", "content": "hi"}, {"role": "assistant", "content": [img("a")]}), "assistant messages cannot hold images"),
        (msgs({"role": "system", "content": "s"}), "no user message"),
    ]
    for messages, words in cases:
        with pytest.raises(RequestError, match=words):
            image_refs(messages, "internvl")
    with pytest.raises(RequestError, match="2 top-level images but 1 <image> placeholders"):
        image_refs(msgs({"role": "user", "content": "<image> hi"}), "internvl", images=["a", "b"])
    with pytest.raises(ValueError, match="does not fit"):
        build_prompt(msgs({"role": "user", "content": [img("a")]}), "internlm2-chat", None, [1, 1])


def test_swift_top_level_images_fill_placeholders():
    messages = msgs({"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "<image><image>Both?"})
    prompt = build_prompt(messages, "internlm2-chat", None, [1, 2, 1], images=["a", "b", "c"])
    assert [r.url for r in prompt.images] == ["a", "b", "c"]
    assert f"user\n{ctx(1)}Describe." in prompt.text() and f"user\n{ctx(2)}{ctx(1)}Both?" in prompt.text()
    single = build_prompt(msgs({"role": "user", "content": "Describe."}), "internlm2-chat", None, [2], images=["a"])
    assert f"user\n{ctx(2)}\nDescribe.<|im_end|>" in single.text()


def test_phi3_rendering():
    prompt = build_prompt(msgs({"role": "user", "content": [img("a"), txt("<image>\nWhat?")]}), "phi3-chat", None, [2])
    assert prompt.text() == f"<|system|>\n{SYS}<|end|><|user|>\n{ctx(2)}\nWhat?<|end|><|assistant|>\n"
    assert prompt.stop == ("<|end|>", "<|endoftext|>")


def test_mpt_empty_turn_renders_bare_role():
    prompt = build_prompt(msgs({"role": "user", "content": ""}), "internlm2-chat", None, [])
    assert prompt.text() == f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n<|im_start|>assistant\n"


def pad(n: int = 1) -> str:
    return "<img>" + "<imgpad>" * 256 * n + "</img>"


def test_chatml_qwen_vl_rendering():
    messages = msgs(
        {"role": "user", "content": [img("https://x/1.jpg"), img("https://x/2.jpg"), txt("What differs?")]},
        {"role": "assistant", "content": "Colour."},
        {"role": "user", "content": [txt("Now this:"), img("https://x/3.jpg"), txt("Where is the dog?")]},
    )
    prompt = build_prompt(messages, "chatml", None, [1, 1, 1])
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
        f"\n<|im_start|>user\nPicture 1: {pad()}\nPicture 2: {pad()}\nWhat differs?<|im_end|>"
        "\n<|im_start|>assistant\nColour.<|im_end|>"
        f"\n<|im_start|>user\nNow this:Picture 1: {pad()}\nWhere is the dog?<|im_end|>"
        "\n<|im_start|>assistant\n"
    )
    assert prompt.text() == expected
    assert [r.url for r in prompt.images] == ["https://x/1.jpg", "https://x/2.jpg", "https://x/3.jpg"]
    assert [s.offset for s in prompt.slots] == [0, 256, 512]
    assert prompt.stop == ("<|im_end|>", "<|im_start|>")


def test_chatml_swift_inline_and_top_level_images():
    inline = build_prompt(msgs({"role": "user", "content": "Picture 1: <img>https://x/a.png</img>\nWhat is this?"}), "chatml", None, [1])
    assert inline.text().endswith(f"user\nPicture 1: {pad()}\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    assert [r.url for r in inline.images] == ["https://x/a.png"]
    top = build_prompt(msgs({"role": "user", "content": "What is this?"}), "chatml", None, [1], images=["a"])
    assert f"user\nPicture 1: {pad()}\nWhat is this?" in top.text()
    placed = build_prompt(msgs({"role": "user", "content": "Look <image> here"}), "chatml", None, [1], images=["a"])
    assert f"user\nLook Picture 1: {pad()}\n here" in placed.text()


def test_every_template_and_recipe_is_covered():
    assert {t.image_style for t in TEMPLATES.values()} <= set(IMAGE_STYLES)
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.template in TEMPLATES, f"recipe {name} names unknown template {recipe.template}"
    tested = {"internlm2-chat", "Hermes-2", "phi3-chat", "chatml"}
    assert set(TEMPLATES) == tested, "a new template needs a rendering test here"
