"""Single-token decode with static shapes, replayed as a CUDA graph.

At batch 1 a decode step is a few hundred small kernels, so launch overhead dominates on a GPU.
`StaticDecoder.step` keeps every shape fixed — attention runs over the whole cache capacity with a
mask `slot <= position`, the new k/v are written with `index_copy_` at a position held in a tensor —
so one step can be captured once and replayed. The math is `TorchLLM._decode`'s for one token; the
same static step also runs eagerly (on the CPU in tests) to prove it equals the dynamic path.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from vlmbuild.llm.torch_runtime import KVCache, TorchLLM, _rms_norm, _rotate

log = logging.getLogger(__name__)
MIN_CAPACITY = 256


def static_ok(llm: TorchLLM, capacity: int) -> str | None:
    """None if a fixed-shape step reproduces the model up to `capacity` tokens, else why not."""
    rot = llm.rotary
    if rot.kind == "dynamic" and capacity > rot.max_pos:
        return "dynamic NTK rope changes its base past max_position_embeddings"
    if llm.logn and capacity > (llm.cfg.seq_length or 8192):
        return "QWen logn scaling changes past seq_length"
    return None


class StaticDecoder:
    def __init__(self, llm: TorchLLM, capacity: int, capture: bool):
        self.llm, self.capacity = llm, capacity
        self.cache = llm.new_cache(capacity)
        self.cache.k.zero_()  # masked slots still enter attn @ v: keep them finite
        self.cache.v.zero_()
        dev = llm.device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.slots = torch.arange(capacity, device=dev)
        rot = llm.rotary
        self.inv = rot.inv_freq(1).to(dev)  # [rotary_dim / 2]; position-independent below
        self.inv_long = rot.inv_freq(rot.orig_max + 1).to(dev) if rot.long_rope else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if capture:
            self._capture()

    def reset(self) -> KVCache:
        self.cache.length = 0
        return self.cache

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Logits [V] (float32) of `token` placed at the cache's next position."""
        self.token.fill_(token)
        self.pos.fill_(self.cache.length)
        if self.graph is not None:
            self.graph.replay()
            out = self.logits.clone()
        else:
            out = self._forward()
        self.cache.length += 1
        return out

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):  # warm-up allocations outside the graph
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def _cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        rot, inv = self.llm.rotary, self.inv
        if self.inv_long is not None:  # Phi-3: long factors once the sequence passes the original context
            inv = torch.where(self.pos + 1 > rot.orig_max, self.inv_long, self.inv)
        freqs = self.pos.float()[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [1, rotary_dim]
        scale = rot.mscale if rot.long_rope else 1.0
        return (emb.cos() * scale).to(self.llm.dtype), (emb.sin() * scale).to(self.llm.dtype)

    def _forward(self) -> torch.Tensor:
        llm, cfg, cache = self.llm, self.llm.cfg, self.cache
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        x = llm.embedding[self.token]  # [1, H]: decode tokens are sampled ids, never image rows (and no host sync)
        cos, sin = self._cos_sin()
        mask = (self.slots <= self.pos)[None, :]  # [1, capacity]
        for i, layer in enumerate(llm.layers):
            h = _rms_norm(x, layer.input_norm, cfg.norm_epsilon)
            q, k, v = F.linear(h, layer.qkv_w, layer.qkv_b).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = _rotate(q.view(1, nh, hd).transpose(0, 1), cos, sin)  # [nh, 1, hd]
            cache.k[i].index_copy_(1, self.pos, _rotate(k.view(1, nkv, hd).transpose(0, 1), cos, sin))
            cache.v[i].index_copy_(1, self.pos, v.view(1, nkv, hd).transpose(0, 1))
            out = F.scaled_dot_product_attention(q[None], cache.k[i][None], cache.v[i][None], attn_mask=mask,
                                                 enable_gqa=nkv != nh)[0]  # [nh, 1, hd]
            x = x + F.linear(out.transpose(0, 1).reshape(1, nh * hd), layer.dense_w, layer.dense_b)
            x = x + llm._mlp(_rms_norm(x, layer.post_norm, cfg.norm_epsilon), layer)
        return llm._logits(x)[0]


class GraphPool:
    """One static decoder at a time, sized to the next power of two that fits the request (grown,
    never shrunk, so steady traffic captures once)."""

    def __init__(self, llm: TorchLLM, capture: bool):
        self.llm, self.capture = llm, capture
        self.current: StaticDecoder | None = None

    def decoder(self, capacity: int) -> StaticDecoder | None:
        size = max(MIN_CAPACITY, 1 << (capacity - 1).bit_length())
        size = min(size, max(capacity, self.llm.max_seq_len))
        why = static_ok(self.llm, size)
        if why:
            log.info("decode runs eagerly for this request: %s", why)
            return None
        if self.current is None or self.current.capacity < capacity:
            self.current = None  # free the smaller cache first
            self.current = StaticDecoder(self.llm, size, self.capture)
            log.info("decode step %s at capacity %d", "captured as a CUDA graph" if self.capture else "static", size)
        return self.current
