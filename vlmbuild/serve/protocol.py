"""OpenAI chat-completions wire format: pydantic models only (the vLLM `protocol.py` split).

Requests ignore unknown fields (OpenAI SDKs send extras such as `user` or `logprobs`); fields we do
read are range-checked here so a bad value is a 400 naming the field, before any work starts.
`parse_chat_request` turns pydantic's error into a `RequestError` the server maps to OpenAI JSON.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from vlmbuild.errors import RequestError, VlmbuildError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)


class ImageUrl(_Lenient):
    url: str = Field(min_length=1)
    """`http(s)://…`, `data:image/…;base64,…`, or `file://…` (only under the server's allowed directory)."""
    detail: Literal["auto", "low", "high"] | None = None
    """Accepted for compatibility; tiling is fixed by the model's recipe."""


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        # Some clients send `"image_url": "https://…"` instead of `{"url": …}`.
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]

# Tags of the `content` union; dropped from error locations so `param` reads `messages.0.content.1`.
_CONTENT_TAGS = ("string", "parts")


def _content_kind(value: Any) -> str | None:
    return "string" if isinstance(value, str) else "parts" if isinstance(value, list) else None


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    # A callable discriminator makes pydantic report only the branch the value's type selects.
    content: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[ContentPart], Tag("parts")],
        Discriminator(_content_kind, custom_error_type="content_type", custom_error_message="content must be a string or a list of parts"),
    ] | None = None
    """A string, or a list of text / image_url parts; None only for assistant turns."""


class StreamOptions(_Lenient):
    include_usage: bool = False
    """Send one extra chunk before `[DONE]` carrying `usage` and no choices."""


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    """Served model name; None means the one model this server serves."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    """Legacy spelling of `max_completion_tokens`."""
    max_completion_tokens: int | None = Field(None, ge=1)
    """Most tokens to generate; wins over `max_tokens` when both are set."""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """0 means greedy; None uses the model's generation defaults."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """0 or -1 disable top-k (both spellings are in use: vLLM old/new, Qwen's generation_config)."""
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    """Extra stop strings (the template's stop tokens always apply)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    """Only 1 is supported."""
    images: list[str] | None = None
    """ms-swift style: image URLs bound to `<image>` placeholders in the messages, in order."""

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        if len(items) > 16:
            raise ValueError(f"at most 16 stop strings are supported, got {len(items)}")
        return value

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported, got n={value}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "ChatCompletionRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; the first problem becomes a one-line `RequestError` with `param`."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p not in _CONTENT_TAGS) or None
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        where = f"{param}: " if param else ""
        raise RequestError(f"invalid request: {where}{first['msg']}{more}", param=param, code="invalid_value") from None


# ---- responses ---------------------------------------------------------------------------------


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0

    @model_validator(mode="after")
    def _total(self) -> "UsageInfo":
        self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self


FinishReason = Literal["stop", "length"]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionStreamResponse(BaseModel):
    """One SSE `data:` chunk; the usage-only chunk has `choices=[]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "vlmbuild"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- errors ------------------------------------------------------------------------------------

# OpenAI's string `type` per HTTP status (peers.md §3.1); anything unlisted is a server error.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "server_overloaded",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's nested error body `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo

    @classmethod
    def build(cls, status: int, message: str, param: str | None = None, code: str | None = None) -> "ErrorResponse":
        return cls(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param, code=code))

    @classmethod
    def from_error(cls, err: VlmbuildError) -> "ErrorResponse":
        return cls.build(err.http_status, str(err), getattr(err, "param", None), getattr(err, "code", None))
