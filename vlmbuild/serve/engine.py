"""Request → tokens: media, tiling, vision, prompt with fake ids, generation, detokenization.

One generation runs at a time on a dedicated worker thread (requests queue FIFO on an asyncio
lock), so concurrent requests never interleave inside a backend; with the TRT-LLM backend the
Executor batches in flight and the lock only guards the vision step."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


from vlmbuild.llm.sampling import SamplingParams
from vlmbuild.serve.protocol import ChatCompletionRequest
from vlmbuild.serve.runtime import BuiltRequest, ServingModel

log = logging.getLogger("vlmbuild.serve")


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Prepared:
    """A validated request, ready to run: ids with fake image ids and pixels, plus sampling."""

    request_id: str
    built: BuiltRequest
    params: SamplingParams
    max_new_tokens: int
    stop_strings: list[str] = field(default_factory=list)


class ChatEngine:
    def __init__(self, model: ServingModel):
        self.model = model
        self.model_name = model.name
        self.model_names = model.aliases  # what a request's `model` may say
        self.max_model_len = model.max_seq_len
        self._lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmbuild-gen")
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vlmbuild-media")

    async def prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Everything that can fail because of the request, before any response byte is sent."""
        loop = asyncio.get_running_loop()
        built = await loop.run_in_executor(self._io, self.model.build_request, req)
        return Prepared(request_id=f"chatcmpl-{uuid.uuid4().hex}", built=built, params=self.model.sampling(req),
                        max_new_tokens=self.model.max_new_tokens(req, len(built.input_ids)), stop_strings=req.stop_list)

    async def run(self, p: Prepared) -> AsyncIterator[Delta | Finished]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            t0 = time.time()
            tokens = await loop.run_in_executor(self._worker, self._start, p)
            detok = Detokenizer(self.model.tokenizer, p.stop_strings)
            n, reason = 0, "length"
            try:
                while True:
                    token = await loop.run_in_executor(self._worker, next, tokens, None)
                    if token is None:
                        break
                    n += 1
                    if token in self.model.stop_token_ids:
                        reason = "stop"
                        break
                    text, hit = detok.push(token)
                    if text:
                        yield Delta(text)
                    if hit:
                        reason = "stop"
                        break
            finally:
                await loop.run_in_executor(self._worker, tokens.close)
            tail = detok.flush()
            if tail:
                yield Delta(tail)
            prompt_tokens = len(p.built.input_ids)
            log.info("%s: %d prompt + %d completion tokens, %.2fs (%s)", p.request_id, prompt_tokens, n,
                     time.time() - t0, reason)
            yield Finished(reason, prompt_tokens, n)

    def _start(self, p: Prepared) -> Iterator[int]:
        b = p.built
        table = self.model.encode_images(b.pixel_values)
        return self.model.llm.generate(b.input_ids, table, p.params, self.model.stop_token_ids, p.max_new_tokens,
                                       **self.model.backend_extras(b.image_keys, b.rows_per_image))


class Detokenizer:
    """Incremental text from token ids: emits only complete characters, holds back text that might
    still become a stop string, and cuts at the first stop string."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tok = tokenizer
        self.stops = stop_strings
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        if self.tok.is_byte(token) or not self.tok.decode([token]):
            # A run of byte-fallback pieces decodes as one group (an invalid group turns every byte
            # into U+FFFD), and a skipped special token does not end the run, so the text is final
            # only once a token that renders as text closes it.
            return "", False
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        self.text = text
        for s in self.stops:
            at = text.find(s)
            if at != -1:
                out = text[self.sent:at]
                self.sent, self.text, self.stopped = at, text[:at], True
                return out, True
        upto = max(self.sent, len(text) - self.hold)
        out = text[self.sent:upto]
        self.sent = upto
        return out, False

    def flush(self) -> str:
        """The rest of the text; at the end an incomplete character is emitted as decode gives it."""
        if not self.stopped:
            self.text = self.tok.decode(self.ids)
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
