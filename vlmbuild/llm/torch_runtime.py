"""Portable LLM backend: runs a TensorRT-LLM checkpoint directory in PyTorch with TRT-LLM semantics.

It reads `config.json` + `rank{r}.safetensors` (never the HF checkpoint), undoes any TP/PP split
so a sharded checkpoint runs on one device, and implements the decoder TRT-LLM builds from it:
prompt-table embedding (ids >= vocab_size select table rows, trtllm-facts §5.1), RMSNorm, fused
qkv with GQA, GPT-NeoX rotary (plain / linear / dynamic NTK / Phi-3 long rope), QWen logn
scaling, GatedMLP `proj(silu(fc(x)) * gate(x))` or swiglu, ln_f and lm_head, with a KV cache.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlmbuild.errors import CheckpointError, RequestError, UnsupportedError
from vlmbuild.llm.sampling import SamplingParams, sample_next
from vlmbuild.llm.trtllm_config import DTYPES, TrtLlmConfig

log = logging.getLogger(__name__)

ACTIVATIONS = {"silu": F.silu, "swiglu": F.silu}
ROPE_SCALINGS = ("linear", "dynamic")
# Tensor-parallel layout (trtllm-facts §2.4): column-parallel parts split dim 0, row-parallel dim 1.
COLUMN_PARALLEL = ("attention.qkv.", "mlp.fc.", "mlp.gate.", "lm_head.")
ROW_PARALLEL = ("attention.dense.weight", "mlp.proj.weight")


@dataclass
class _Layer:
    input_norm: torch.Tensor  # [H]
    qkv_w: torch.Tensor  # [(nh + 2 nkv) hd, H], rows [Q; K; V]
    qkv_b: torch.Tensor | None
    dense_w: torch.Tensor  # [H, nh hd]
    dense_b: torch.Tensor | None
    post_norm: torch.Tensor  # [H]
    fc_w: torch.Tensor  # [I, H] activated branch
    fc_b: torch.Tensor | None
    gate_w: torch.Tensor  # [I, H] linear branch
    gate_b: torch.Tensor | None
    proj_w: torch.Tensor  # [H, I]
    proj_b: torch.Tensor | None


class KVCache:
    """One sequence's keys and values: [layers, n_kv, capacity, head_size] each."""

    def __init__(self, cfg: TrtLlmConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, capacity, cfg.head_size)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0


class Rotary:
    """cos/sin tables [T, rotary_dim] for absolute positions, per the config's rope variant."""

    def __init__(self, cfg: TrtLlmConfig):
        extra = cfg.model_extra or {}
        self.dim = int(extra.get("rotary_embedding_dim") or cfg.head_size * (cfg.rotary_pct or 1.0))
        self.base = cfg.rotary_base
        self.max_pos = cfg.max_position_embeddings
        scaling = cfg.rotary_scaling or {}
        self.kind = scaling.get("type", scaling.get("rope_type", "none"))
        self.factor = float(scaling.get("factor", 1.0))
        if self.kind not in ("none", "default", *ROPE_SCALINGS):
            raise UnsupportedError(f"rotary_scaling type '{self.kind}' is not implemented by the torch backend",
                                   hint=f"supported: none, {', '.join(ROPE_SCALINGS)}")
        self.long_rope = cfg.position_embedding_type == "long_rope"
        if self.long_rope:
            self.orig_max = cfg.original_max_position_embeddings or self.max_pos
            self.short = torch.tensor(cfg.longrope_scaling_short_factors or [1.0] * (self.dim // 2))
            self.long = torch.tensor(cfg.longrope_scaling_long_factors or [1.0] * (self.dim // 2))
            ratio = self.max_pos / self.orig_max
            # transformers modeling_rope_utils._compute_longrope_parameters; TRT-LLM's default mscale
            self.mscale = math.sqrt(1 + math.log(ratio) / math.log(self.orig_max)) if ratio > 1 else 1.0

    @property
    def max_seq_len(self) -> int:
        """What trtllm-build derives when max_seq_len is unset (trtllm-facts §1.9)."""
        return int(self.max_pos * self.factor) if self.kind in ROPE_SCALINGS else self.max_pos

    def inv_freq(self, seq_len: int) -> torch.Tensor:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        base = self.base
        if self.kind == "dynamic" and seq_len > self.max_pos:
            # dynamic NTK acts only past max positions (transformers _compute_dynamic_ntk_parameters)
            base = base * (self.factor * seq_len / self.max_pos - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        if self.long_rope:
            ext = self.long if seq_len > self.orig_max else self.short
            return 1.0 / (ext * base**exponent)
        inv = 1.0 / (base**exponent)
        return inv / self.factor if self.kind == "linear" else inv

    def cos_sin(self, positions: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq(seq_len).to(positions.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, rotary_dim]
        scale = self.mscale if self.long_rope else 1.0
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotate-half over the first rotary_dim channels. x: [heads, T, hd]."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = torch.cat([-rot[..., d // 2:], rot[..., : d // 2]], dim=-1)
    return torch.cat([rot * cos + half * sin, rest], dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class TorchLLM:
    def __init__(self, cfg: TrtLlmConfig, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        if cfg.hidden_act not in ACTIVATIONS:
            raise UnsupportedError(f"hidden_act '{cfg.hidden_act}' is not implemented by the torch backend",
                                   hint=f"supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.rotary = Rotary(cfg)
        w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        self.embedding = _required(w, "transformer.vocab_embedding.weight")  # [V, H]
        self.ln_f = _required(w, "transformer.ln_f.weight")
        self.lm_head = w.get("lm_head.weight", self.embedding)[: cfg.vocab_size]  # padded rows dropped
        self.layers = [_layer(w, i, cfg) for i in range(cfg.num_hidden_layers)]
        self.logn = bool(cfg.use_logn_attn) and cfg.qwen_type == "qwen"
        self.graphs = None  # a GraphPool when decode steps run as CUDA graphs (see graph_decode.py)

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str | torch.device = "cpu",
             dtype: str | torch.dtype | None = None, cuda_graphs: bool = True) -> "TorchLLM":
        """Load a (possibly TP/PP-sharded) checkpoint; dtype defaults to the checkpoint's. On a CUDA
        device single-token decode steps are replayed as CUDA graphs unless `cuda_graphs` is False."""
        cfg = TrtLlmConfig.read(checkpoint_dir)
        weights = merge_shards(_read_ranks(Path(checkpoint_dir), cfg), cfg)
        _check_quantization(weights, cfg)
        run_dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or DTYPES[cfg.dtype])
        llm = cls(cfg, weights, torch.device(device), run_dtype)
        if llm.device.type == "cuda" and cuda_graphs:
            from vlmbuild.llm.graph_decode import GraphPool

            llm.graphs = GraphPool(llm, capture=True)
        return llm

    @property
    def max_seq_len(self) -> int:
        return self.rotary.max_seq_len

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.cfg, capacity, self.dtype, self.device)

    @torch.inference_mode()
    def forward_logits(self, input_ids: list[int], prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [T, vocab_size] for every position of one sequence."""
        self._check_prompt(input_ids, 0)
        hidden = self._decode(input_ids, prompt_table, self.new_cache(len(input_ids)))
        return self._logits(hidden)

    def generate(self, input_ids: list[int], prompt_table: torch.Tensor | None = None,
                 params: SamplingParams = SamplingParams(), stop_token_ids: set[int] | frozenset[int] = frozenset(),
                 max_new_tokens: int = 256) -> Iterator[int]:
        """Stream new token ids. A stop token, when hit, is yielded last so callers can tell
        'stop' from 'length'. Generation also ends at max_new_tokens or max_seq_len.
        Request errors are raised here, before the first token is asked for."""
        self._check_prompt(input_ids, 1)
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}", param="max_tokens")
        if prompt_table is not None and prompt_table.shape[-1] != self.cfg.hidden_size:
            raise RequestError(f"the prompt table rows have {prompt_table.shape[-1]} values, "
                               f"the model's hidden size is {self.cfg.hidden_size}")
        budget = min(max_new_tokens, self.max_seq_len - len(input_ids))
        return self._stream(input_ids, prompt_table, params, stop_token_ids, budget)

    def _stream(self, input_ids: list[int], prompt_table: torch.Tensor | None, params: SamplingParams,
                stop_token_ids: set[int] | frozenset[int], budget: int) -> Iterator[int]:
        static = self.graphs.decoder(len(input_ids) + budget) if self.graphs else None
        cache = static.reset() if static else self.new_cache(len(input_ids) + budget)
        generator = None if params.greedy else params.generator(self.device)
        history = [t for t in input_ids if t < self.cfg.vocab_size]  # fake ids are not vocabulary
        logits = self._step(input_ids, prompt_table, cache)  # prefill: eager, variable length
        for n in range(budget):
            token = sample_next(logits, params, generator, history)
            yield token
            if token in stop_token_ids or n == budget - 1:
                return
            history.append(token)
            logits = static.step(token) if static else self._step([token], None, cache)

    @torch.inference_mode()
    def _step(self, ids: list[int], prompt_table: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run ids after what the cache holds; float32 logits [V] of the last position."""
        return self._logits(self._decode(ids, prompt_table, cache)[-1:])[0]

    def _check_prompt(self, input_ids: list[int], room: int) -> None:
        if not input_ids:
            raise RequestError("the prompt is empty", param="messages")
        if len(input_ids) + room > self.max_seq_len:
            raise RequestError(f"the prompt has {len(input_ids)} tokens but the model allows {self.max_seq_len} in all",
                               param="messages", code="context_length_exceeded")

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (_rms_norm(hidden, self.ln_f, self.cfg.norm_epsilon) @ self.lm_head.T).float()

    def _embed(self, ids: torch.Tensor, prompt_table: torch.Tensor | None) -> torch.Tensor:
        """[T] ids → [T, H]; id >= vocab_size takes prompt-table row id - vocab_size."""
        vocab = self.cfg.vocab_size
        fake = ids >= vocab
        x = self.embedding[ids.clamp(max=vocab - 1)]
        if fake.any():
            rows = ids[fake] - vocab
            n_rows = 0 if prompt_table is None else prompt_table.shape[0]
            if int(rows.max()) >= n_rows:
                raise RequestError(f"input id {int(ids[fake].max())} needs prompt-table row {int(rows.max())} "
                                   f"but the table has {n_rows} rows")
            x[fake] = prompt_table.to(device=x.device, dtype=x.dtype)[rows]
        return x

    def _decode(self, ids: list[int], prompt_table: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Append ids to the cache and return the final hidden states [T, H] (before ln_f)."""
        start, count = cache.length, len(ids)
        x = self._embed(torch.tensor(ids, device=self.device), prompt_table)
        positions = torch.arange(start, start + count, device=self.device)
        cos, sin = self.rotary.cos_sin(positions, start + count, self.dtype)
        q_scale = self._logn_scale(positions)
        # causal over cache + new tokens: query at position p sees keys 0..p; [T, start + T]
        mask = None if count == 1 else torch.arange(start + count, device=self.device)[None, :] <= positions[:, None]
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, self.cfg.norm_epsilon)
            x = x + self._attention(h, layer, i, cache, cos, sin, mask, q_scale)
            x = x + self._mlp(_rms_norm(x, layer.post_norm, self.cfg.norm_epsilon), layer)
        cache.length = start + count
        return x

    def _mlp(self, h: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """GatedMLP / swiglu: proj(act(fc(h)) * gate(h)), fc being the activated branch."""
        return F.linear(self.act(F.linear(h, layer.fc_w, layer.fc_b)) * F.linear(h, layer.gate_w, layer.gate_b),
                        layer.proj_w, layer.proj_b)

    def _attention(self, h: torch.Tensor, layer: _Layer, i: int, cache: KVCache, cos: torch.Tensor,
                   sin: torch.Tensor, mask: torch.Tensor | None, q_scale: torch.Tensor | None) -> torch.Tensor:
        cfg, hd, count, start = self.cfg, self.cfg.head_size, h.shape[0], cache.length
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = F.linear(h, layer.qkv_w, layer.qkv_b)  # [T, (nh + 2 nkv) hd]
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = _rotate(q.view(count, nh, hd).transpose(0, 1), cos, sin)  # [nh, T, hd]
        k = _rotate(k.view(count, nkv, hd).transpose(0, 1), cos, sin)
        if q_scale is not None:
            q = q * q_scale[None, :, None]
        cache.k[i, :, start:start + count] = k
        cache.v[i, :, start:start + count] = v.view(count, nkv, hd).transpose(0, 1)
        keys, values = cache.k[i, :, : start + count], cache.v[i, :, : start + count]
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                             enable_gqa=nkv != nh)[0]  # [nh, T, hd]
        return F.linear(out.transpose(0, 1).reshape(count, nh * hd), layer.dense_w, layer.dense_b)

    def _logn_scale(self, positions: torch.Tensor) -> torch.Tensor | None:
        """QWen v1 logn attention: q at 0-based position p scaled by log_{seq_length}(p + 1) past
        seq_length (Qwen-VL-Chat modeling_qwen.py `logn_list`; TRT-LLM use_logn_scaling)."""
        if not self.logn:
            return None
        n = (positions + 1).double()
        limit = float(self.cfg.seq_length or 8192)
        return torch.where(n > limit, n.log() / math.log(limit), torch.ones_like(n)).to(self.dtype)


def _required(w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in w:
        raise CheckpointError(f"the checkpoint lacks {name}", hint="re-run vlmbuild convert")
    return w[name]


def _layer(w: dict[str, torch.Tensor], i: int, cfg: TrtLlmConfig) -> _Layer:
    p = f"transformer.layers.{i}."
    qkv_w = _required(w, p + "attention.qkv.weight")
    rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_size
    if qkv_w.shape[0] != rows:
        raise CheckpointError(f"layer {i} qkv has {qkv_w.shape[0]} rows, the config's heads need {rows}")
    fc_w, fc_b = _required(w, p + "mlp.fc.weight"), w.get(p + "mlp.fc.bias")
    if cfg.hidden_act == "swiglu":  # fused fc [2I, H] = [linear; activated]
        gate_w, fc_w = fc_w.chunk(2, dim=0)
        gate_b, fc_b = fc_b.chunk(2, dim=0) if fc_b is not None else (None, None)
    else:
        gate_w, gate_b = _required(w, p + "mlp.gate.weight"), w.get(p + "mlp.gate.bias")
    return _Layer(
        input_norm=_required(w, p + "input_layernorm.weight"), qkv_w=qkv_w, qkv_b=w.get(p + "attention.qkv.bias"),
        dense_w=_required(w, p + "attention.dense.weight"), dense_b=w.get(p + "attention.dense.bias"),
        post_norm=_required(w, p + "post_layernorm.weight"), fc_w=fc_w, fc_b=fc_b, gate_w=gate_w, gate_b=gate_b,
        proj_w=_required(w, p + "mlp.proj.weight"), proj_b=w.get(p + "mlp.proj.bias"),
    )


def _read_ranks(checkpoint_dir: Path, cfg: TrtLlmConfig) -> list[dict[str, torch.Tensor]]:
    files = [checkpoint_dir / f"rank{r}.safetensors" for r in range(cfg.world_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint_dir} lacks {', '.join(missing)} for tp_size={cfg.mapping.tp_size} "
                              f"pp_size={cfg.mapping.pp_size}", hint="re-run vlmbuild convert")
    return [load_file(str(f)) for f in files]


def merge_shards(ranks: list[dict[str, torch.Tensor]], cfg: TrtLlmConfig) -> dict[str, torch.Tensor]:
    """Undo the TP split and PP staging: full tensors with global layer numbers.
    Rank r = pp_rank * tp + tp_rank; stage pp_rank holds `tensor_split(arange(L), pp)[pp_rank]`."""
    tp, pp = cfg.mapping.tp_size, cfg.mapping.pp_size
    stages = torch.tensor_split(torch.arange(cfg.num_hidden_layers), pp)
    full: dict[str, torch.Tensor] = {}
    for pp_rank, stage in enumerate(stages):
        shards = ranks[pp_rank * tp:(pp_rank + 1) * tp]
        for name in shards[0]:
            parts = [s.get(name) for s in shards]
            if any(p is None for p in parts):
                raise CheckpointError(f"{name} is on tensor-parallel rank 0 of stage {pp_rank} but not on every rank")
            full[_global_name(name, int(stage[0]) if len(stage) else 0)] = _unsplit(name, parts, cfg)
    if "lm_head.weight" in full:
        full["lm_head.weight"] = full["lm_head.weight"][: cfg.vocab_size]
    return full


def _global_name(name: str, first_layer: int) -> str:
    if not name.startswith("transformer.layers."):
        return name
    _, _, index, rest = name.split(".", 3)
    return f"transformer.layers.{int(index) + first_layer}.{rest}"


def _unsplit(name: str, parts: list[torch.Tensor], cfg: TrtLlmConfig) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if ".attention.qkv." in name:
        return _merge_qkv(parts, cfg)
    if ".mlp.fc." in name and cfg.hidden_act == "swiglu":  # each rank holds [linear_r; activated_r]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if any(key in name for key in COLUMN_PARALLEL):
        return torch.cat(parts, dim=0)
    if name.endswith(ROW_PARALLEL):
        return torch.cat(parts, dim=1)
    if name.startswith("transformer.vocab_embedding.") and cfg.use_parallel_embedding:
        return torch.cat(parts, dim=cfg.embedding_sharding_dim)[: cfg.vocab_size]
    if not all(torch.equal(parts[0], p) for p in parts[1:]):
        raise CheckpointError(f"{name} should be replicated on every tensor-parallel rank but the copies differ")
    return parts[0]


def _merge_qkv(parts: list[torch.Tensor], cfg: TrtLlmConfig) -> torch.Tensor:
    """Per rank [Q_r; K_r; V_r] (weight [rows, H] or bias [rows]) → [Q; K; V]. When nkv < tp each
    rank holds one kv head repeated tp/nkv times across ranks: keep one copy, check the others."""
    tp, nh, nkv, hd = len(parts), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    kv_rows = math.ceil(nkv / tp) * hd
    split = [p.split([nh // tp * hd, kv_rows, kv_rows], dim=0) for p in parts]
    rep = tp // nkv if nkv < tp else 1
    for r in range(tp):
        if not (torch.equal(split[r][1], split[r - r % rep][1]) and torch.equal(split[r][2], split[r - r % rep][2])):
            raise CheckpointError(f"rank {r} holds a kv head that differs from its duplicate on rank {r - r % rep}")
    pieces = [[s[j] for s in split[:: (rep if j else 1)]] for j in range(3)]
    return torch.cat([torch.cat(p, dim=0) for p in pieces], dim=0)


def _check_quantization(weights: dict[str, torch.Tensor], cfg: TrtLlmConfig) -> None:
    stored = [n for n, t in weights.items() if not t.is_floating_point() or n.endswith("per_channel_scale")]
    if stored:
        raise UnsupportedError(f"the checkpoint holds pre-quantized weights ({stored[0]} …); the torch backend "
                               "runs float weights only",
                               hint="convert with --weight-only and let trtllm-build quantize")
    if cfg.quantization.quant_algo:
        log.info("quant_algo %s: the checkpoint holds float weights (quantized at engine build); "
                 "the torch backend runs them unquantized", cfg.quantization.quant_algo)

