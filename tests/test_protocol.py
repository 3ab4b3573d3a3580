"""OpenAI request/response models: what clients send parses, bad values are 400s naming the field,
and responses have the shape the `openai` SDK reads (checked with the SDK's own types)."""

from __future__ import annotations

import json

import pytest

from vlmbuild.errors import ModelNotFoundError, RequestError
from vlmbuild.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    ErrorResponse,
    ImagePart,
    ModelCard,
    ModelList,
    ResponseMessage,
    TextPart,
    UsageInfo,
    parse_chat_request,
)


def _body(**extra):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_reference_workflow_request_parses():
    req = parse_chat_request(
        {
            "model": "internvl2",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "<image>\nDescribe."},
                        {"type": "image_url", "image_url": {"url": "https://x/a.jpg", "detail": "high"}},
                    ],
                },
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "And?"},
            ],
            "max_tokens": 64,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 50,
            "repetition_penalty": 1.05,
            "seed": 7,
            "stop": "###",
            "stream": True,
            "stream_options": {"include_usage": True},
            "images": ["data:image/png;base64,AAAA"],
            "user": "sdk-extra",  # unknown fields are ignored
            "logprobs": False,
        }
    )
    parts = req.messages[1].content
    assert isinstance(parts[0], TextPart) and isinstance(parts[1], ImagePart)
    assert parts[1].image_url.url == "https://x/a.jpg" and parts[1].image_url.detail == "high"
    assert req.max_new_tokens == 64 and req.stop_list == ["###"] and req.include_usage
    assert req.images == ["data:image/png;base64,AAAA"]


def test_max_completion_tokens_wins_and_bare_image_url():
    req = parse_chat_request(
        _body(max_tokens=10, max_completion_tokens=20, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]}])
    )
    assert req.max_new_tokens == 20
    assert req.messages[0].content[0].image_url.url == "https://x/y.png"
    assert parse_chat_request(_body()).max_new_tokens is None


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"n": 2}, "n", "only n=1"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"stop": ["a", ""]}, "stop", "non-empty"),
        ({"stream_options": {"include_usage": True}}, None, "only allowed when stream is true"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "'system', 'user' or 'assistant'"),
        ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]}, "messages.0.content.0", "'text', 'image_url'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "string or a list of parts"),
    ],
)
def test_invalid_values_are_400_naming_the_field(extra, param, words):
    with pytest.raises(RequestError) as info:
        parse_chat_request(_body(**extra))
    err = info.value
    assert err.http_status == 400
    assert words in str(err), str(err)
    if param:
        assert err.param is not None and err.param.startswith(param), err.param
    assert "\n" not in str(err)


def test_response_shapes_load_into_openai_sdk_types():
    openai_types = pytest.importorskip("openai.types.chat")
    resp = ChatCompletionResponse(
        model="m",
        choices=[ChatCompletionChoice(message=ResponseMessage(content="hello"), finish_reason="length")],
        usage=UsageInfo(prompt_tokens=3383, completion_tokens=5),
    )
    data = json.loads(resp.model_dump_json())
    assert data["usage"]["total_tokens"] == 3388 and data["id"].startswith("chatcmpl-")
    sdk = openai_types.ChatCompletion.model_validate(data)
    assert sdk.choices[0].message.content == "hello" and sdk.choices[0].finish_reason == "length"

    chunk = ChatCompletionStreamResponse(id=resp.id, model="m", choices=[ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content="he"))])
    usage_chunk = ChatCompletionStreamResponse(id=resp.id, model="m", choices=[], usage=UsageInfo(prompt_tokens=1, completion_tokens=2))
    for c in (chunk, usage_chunk):
        sdk_chunk = openai_types.ChatCompletionChunk.model_validate(json.loads(c.model_dump_json()))
        assert sdk_chunk.object == "chat.completion.chunk"
    assert sdk_chunk.usage.total_tokens == 3

    models = ModelList(data=[ModelCard(id="internvl2-8b", max_model_len=8192)])
    page = pytest.importorskip("openai.types").Model.model_validate(json.loads(models.model_dump_json())["data"][0])
    assert page.id == "internvl2-8b" and page.owned_by == "vlmbuild"


def test_error_response_is_openai_nested_shape():
    body = json.loads(ErrorResponse.from_error(RequestError("image 0 (https://x): HTTP 404", param="messages", code="invalid_image")).model_dump_json())
    assert body == {"error": {"message": "image 0 (https://x): HTTP 404", "type": "invalid_request_error", "param": "messages", "code": "invalid_image"}}
    assert ErrorResponse.from_error(ModelNotFoundError("no such model", param="model")).error.type == "not_found_error"
    assert ErrorResponse.build(500, "boom").error.type == "server_error"
    assert ErrorResponse.build(429, "busy").error.type == "rate_limit_error"
