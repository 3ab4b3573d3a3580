"""The server's HTTP contract: OpenAI error shapes and statuses, SSE framing, stops, limits,
concurrency and the API key, against a served tiny InternVL2-1B."""

from __future__ import annotations

import base64
import io
import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from vlmbuild.pipeline import build_workdir
from vlmbuild.recipe import load_recipe
from vlmbuild.serve.runtime import ServeOptions
from vlmbuild.serve.server import BackgroundServer, make_app
from vlmbuild.synth import synth_checkpoint

MODEL = "tiny-internvl2-1b"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    recipe = load_recipe(MODEL)
    synth_checkpoint(recipe, root / "work" / "hf", seed=random.randrange(1 << 20))
    build_workdir(recipe, root / "work", builder="none")
    return root / "work"


@pytest.fixture(scope="module")
def url(workdir):
    with BackgroundServer(make_app(workdir, ServeOptions(device="cpu"))) as base:
        yield base


def _png(w: int, h: int, seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _msg(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _post(url: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"},
                      timeout=60, **kw)


def _assert_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for n in needles:
        assert n in err["message"], err
    return err


def test_reference_guide_model_name_is_accepted(url):
    """grps-trtllm's guide sends "model": "InternVL2" for every size; those requests work unchanged."""
    body = {"model": "InternVL2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = _post(url, body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL


def test_health_and_models(url):
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]


@pytest.mark.parametrize("body,status,needles", [
    (b"{not json", 400, ("not valid JSON",)),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, ("gpt-4",)),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, ("n=2",)),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, ("temperature",)),
    ({"messages": []}, 400, ("messages",)),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, ("max_tokens",)),
])
def test_bad_requests_are_openai_errors(url, body, status, needles):
    _assert_error(_post(url, body), status, *needles)


def test_placeholder_count_mismatch_is_400(url):
    body = {"messages": _msg("<image>\n<image>\ntwo placeholders", _png(64, 64, 1))}
    _assert_error(_post(url, body), 400, "<image>")


def test_broken_and_refused_images_name_the_image(url, tmp_path):
    err = _assert_error(_post(url, {"messages": _msg("<image>\nx", "data:image/png;base64,AAAA")}), 400, "image 0")
    assert err["code"] == "invalid_image"
    (tmp_path / "a.png").write_bytes(base64.b64decode(_png(32, 32, 2).split(",", 1)[1]))
    _assert_error(_post(url, {"messages": _msg("<image>\nx", f"file://{tmp_path}/a.png")}), 400, "image 0")


def test_too_many_tiles_is_400(url):
    big = _png(1800, 1350, 3)  # a 4x3 grid + thumbnail = 13 tiles each: three exceed 26
    body = {"messages": _msg("Image-1: <image>\nImage-2: <image>\nImage-3: <image>\n", big, big, big)}
    _assert_error(_post(url, body), 400, "tiles")


def test_sse_framing_usage_and_done(url):
    body = {"messages": _msg("<image>\nhi", _png(300, 200, 4)), "stream": True, "max_tokens": 5, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] <= 5
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_length_and_stop_strings(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    # A random model may stop at once on some image; try a few until one runs to max_tokens.
    for k in range(8):
        msgs = _msg("<image>\nTell me", _png(200 + 40 * k, 300, 5 + k))
        long = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, seed=1)
        text = long.choices[0].message.content
        if long.choices[0].finish_reason == "length" and len(text) >= 4:
            break
    else:
        pytest.fail("eight requests all stopped before max_tokens with text to cut")
    assert long.usage.completion_tokens == 16
    stop = text[2:4]
    cut = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_concurrent_requests_equal_their_solo_answers(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    requests = [_msg("<image>\nWhat is it?", _png(200 + 150 * i, 300, 10 + i)) for i in range(3)]

    def ask(msgs):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
        return r.choices[0].message.content, r.usage.prompt_tokens

    solo = [ask(m) for m in requests]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, requests))
    assert together == solo


def test_api_key(workdir):
    with BackgroundServer(make_app(workdir, ServeOptions(device="cpu"), api_key="sekret")) as base:
        _assert_error(httpx.get(base + "/v1/models"), 401, "API key")
        ok = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert httpx.get(base + "/health").status_code == 200
