"""TensorRT-LLM engine backend through the Executor bindings (trtllm-facts §5.1–5.2).

It cannot run on this project's CI (no GPU, no tensorrt_llm), so everything that decides *what*
is sent — fake ids, prompt-table limits, KV-reuse extra ids, sampling and stop words — lives in the
pure `plan_request`, which is tested; `TrtllmLLM` only hands that plan to the bindings.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from vlmbuild.errors import RequestError, ToolMissingError, VlmbuildError
from vlmbuild.llm.sampling import SamplingParams
from vlmbuild.llm.trtllm_config import DTYPES, TrtLlmConfig
from vlmbuild.manifest import read_manifest



@dataclass(frozen=True)
class RequestPlan:
    """Everything one `executor.Request` carries, as plain data."""

    input_token_ids: list[int]
    max_tokens: int
    end_id: int | None
    stop_words: list[list[int]]
    sampling: dict[str, float | int]
    embedding_table: torch.Tensor | None = None  # [rows, hidden] in the engine dtype
    input_token_extra_ids: list[int] | None = None
    streaming: bool = True


def sampling_kwargs(params: SamplingParams) -> dict[str, float | int]:
    """SamplingConfig keywords. TRT-LLM has no temperature 0: greedy is top_k = 1."""
    if params.greedy:
        out: dict[str, float | int] = {"top_k": 1}
    else:
        out = {"temperature": params.temperature, "top_p": params.top_p}
        if params.top_k:
            out["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        out["repetition_penalty"] = params.repetition_penalty
    if params.seed is not None:
        out["seed"] = params.seed
    return out


def plan_request(input_ids: list[int], prompt_table: torch.Tensor | None, params: SamplingParams,
                 stop_token_ids: list[int], max_new_tokens: int, cfg: TrtLlmConfig, max_prompt_vocab: int,
                 image_keys: list[bytes] | None = None, rows_per_image: list[int] | None = None) -> RequestPlan:
    """Validate and translate one request for the Executor.

    Per request the fake ids must be `vocab_size + [0, rows)` and rows ≤ max_multimodal_len /
    max_batch_size (the slot the C++ runtime copies the table into). With KV block reuse on, each
    image token also carries an extra id derived from its image, so two different images at the same
    position never share cached blocks.
    """
    vocab = cfg.vocab_size
    fake = [t - vocab for t in input_ids if t >= vocab]
    rows = 0 if prompt_table is None else prompt_table.shape[0]
    if fake and (prompt_table is None or max(fake) >= rows or min(fake) < 0):
        raise RequestError("image token ids do not match the prompt table")
    if rows > max_prompt_vocab:
        raise RequestError(f"the request carries {rows} image tokens but the engine allows {max_prompt_vocab} per request",
                           param="messages", code="too_many_images")
    table = None if prompt_table is None else prompt_table.to(DTYPES[cfg.dtype]).contiguous()
    extra = _extra_ids(input_ids, vocab, image_keys, rows_per_image) if image_keys else None
    return RequestPlan(
        input_token_ids=list(input_ids), max_tokens=max_new_tokens, end_id=stop_token_ids[0] if stop_token_ids else None,
        stop_words=[[t] for t in stop_token_ids], sampling=sampling_kwargs(params), embedding_table=table,
        input_token_extra_ids=extra,
    )


def _extra_ids(input_ids: list[int], vocab: int, image_keys: list[bytes], rows_per_image: list[int]) -> list[int]:
    """0 for text tokens; for an image token, a 63-bit hash of its image's bytes (never 0)."""
    owner: list[int] = []
    for idx, rows in enumerate(rows_per_image):
        owner += [idx] * rows
    hashes = [int.from_bytes(hashlib.sha256(k).digest()[:8], "little") >> 1 | 1 for k in image_keys]
    return [hashes[owner[t - vocab]] if t >= vocab else 0 for t in input_ids]


class TrtllmLLM:
    """Thin adapter over `tensorrt_llm.bindings.executor.Executor` with the LlmBackend interface."""

    def __init__(self, engine_dir: str | Path, checkpoint_cfg: TrtLlmConfig, kv_cache_fraction: float = 0.7):
        try:
            self.ex = importlib.import_module("tensorrt_llm.bindings.executor")
        except ImportError as err:
            raise ToolMissingError("tensorrt_llm is not installed", hint="use --llm-backend torch") from err
        data = read_manifest(engine_dir, "llm-engine").data
        self.cfg = checkpoint_cfg
        self.max_prompt_vocab = data["max_multimodal_len"] // data["max_batch_size"]
        kv = self.ex.KvCacheConfig(free_gpu_memory_fraction=kv_cache_fraction, enable_block_reuse=True)
        config = self.ex.ExecutorConfig(max_beam_width=1, kv_cache_config=kv)
        self.executor = self.ex.Executor(Path(engine_dir), self.ex.ModelType.DECODER_ONLY, config)

    def generate(self, input_ids: list[int], prompt_table: torch.Tensor | None = None,
                 params: SamplingParams = SamplingParams(), stop_token_ids: set[int] | frozenset[int] = frozenset(),
                 max_new_tokens: int = 256, image_keys: list[bytes] | None = None,
                 rows_per_image: list[int] | None = None) -> Iterator[int]:
        plan = plan_request(input_ids, prompt_table, params, sorted(stop_token_ids), max_new_tokens, self.cfg,
                            self.max_prompt_vocab, image_keys, rows_per_image)
        req_id = self.executor.enqueue_request(self._request(plan))
        try:
            yield from self._stream(req_id)
        finally:  # a closed generator (client gone) cancels the request
            self.executor.cancel_request(req_id)

    def _request(self, plan: RequestPlan):
        ex = self.ex
        ptc = None
        if plan.embedding_table is not None:
            ptc = ex.PromptTuningConfig(plan.embedding_table.cuda(), input_token_extra_ids=plan.input_token_extra_ids)
        return ex.Request(plan.input_token_ids, max_tokens=plan.max_tokens, streaming=plan.streaming,
                          sampling_config=ex.SamplingConfig(beam_width=1, **plan.sampling),
                          output_config=ex.OutputConfig(exclude_input_from_output=True), end_id=plan.end_id,
                          stop_words=plan.stop_words or None, prompt_tuning_config=ptc)

    def _stream(self, req_id: int) -> Iterator[int]:
        while True:
            for resp in self.executor.await_responses(req_id, timedelta(seconds=1)):
                if resp.has_error():
                    raise VlmbuildError(f"TensorRT-LLM request failed: {resp.error_msg}")
                yield from resp.result.output_token_ids[0]
                if resp.result.is_final:
                    return
