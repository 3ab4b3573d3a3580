"""FastAPI routes: `/v1/chat/completions` (JSON and SSE), `/v1/models`, `/health`.

Errors leave in OpenAI's shape with the status their type carries (400 bad request, 404 unknown
model, 401 bad key); a client's mistake is never a 500."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from vlmbuild.errors import ModelNotFoundError, RequestError, VlmbuildError
from vlmbuild.serve.engine import ChatEngine, Delta, Finished
from vlmbuild.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
    UsageInfo,
    parse_chat_request,
)

log = logging.getLogger("vlmbuild.serve")


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse.build(status, message, param, code).model_dump(), status_code=status)


def create_app(engine: ChatEngine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="vlmbuild", version="1")
    app.state.engine = engine

    @app.exception_handler(VlmbuildError)
    async def _vlmbuild_error(_: Request, err: VlmbuildError) -> JSONResponse:
        if err.http_status >= 500:
            log.error("request failed: %s", err)
        return JSONResponse(ErrorResponse.from_error(err).model_dump(), status_code=err.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {err.errors()[0].get('msg', err)}")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given, api_key):
                return _error(401, "invalid or missing API key", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        card = ModelCard(id=engine.model_name, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None
        req = parse_chat_request(body)
        if req.model is not None and req.model not in engine.model_names:
            raise ModelNotFoundError(f"the model '{req.model}' does not exist; this server serves '{engine.model_name}'",
                                     param="model", code="model_not_found")
        prepared = await engine.prepare(req)  # media, tiling and prompt errors surface here as 400s
        if req.stream:
            return StreamingResponse(_sse(engine, prepared, req), media_type="text/event-stream")
        return await _complete(engine, prepared)

    return app


async def _complete(engine: ChatEngine, prepared) -> dict:
    text, finished = [], None
    async for event in engine.run(prepared):
        if isinstance(event, Delta):
            text.append(event.text)
        else:
            finished = event
    assert isinstance(finished, Finished)
    choice = ChatCompletionChoice(message=ResponseMessage(content="".join(text)), finish_reason=finished.finish_reason)
    usage = UsageInfo(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens)
    return ChatCompletionResponse(model=engine.model_name, choices=[choice], usage=usage).model_dump()


async def _sse(engine: ChatEngine, prepared, req: ChatCompletionRequest) -> AsyncIterator[str]:
    first = ChatCompletionStreamResponse(model=engine.model_name, id=prepared.request_id,
                                         choices=[ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content=""))])
    yield _data(first)
    try:
        async for event in engine.run(prepared):
            if isinstance(event, Delta):
                choice = ChatCompletionStreamChoice(delta=DeltaMessage(content=event.text))
            else:
                choice = ChatCompletionStreamChoice(delta=DeltaMessage(), finish_reason=event.finish_reason)
            yield _data(ChatCompletionStreamResponse(model=engine.model_name, id=prepared.request_id, choices=[choice]))
            if isinstance(event, Finished) and req.include_usage:
                usage = UsageInfo(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
                yield _data(ChatCompletionStreamResponse(model=engine.model_name, id=prepared.request_id, choices=[], usage=usage))
    except VlmbuildError as err:  # headers are gone: report in-band, as vLLM does
        yield f"data: {json.dumps(ErrorResponse.from_error(err).model_dump())}\n\n"
    yield "data: [DONE]\n\n"


def _data(chunk: ChatCompletionStreamResponse) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"
