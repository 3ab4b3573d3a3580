"""Independent reference for Qwen-VL-Chat, written from docs/model-facts.md §5 with plain torch ops,
transformers' Qwen2ForCausalLM and tiktoken. Nothing here imports vlmbuild.

- `ReferenceVisual`: `transformer.visual` in the original's LND layout; the in_proj rows are picked per
  head by explicit index lists, the resampler is a real `nn.MultiheadAttention`, position tables are
  resized with `F.interpolate` on every call. `per_head_split=False` / `key_pos=False` build the two
  classic mistakes, so tests can show they would be caught.
- `reference_llm`: QWen v1 = Qwen2 with KV = heads, q/k/v bias, rope θ `rotary_emb_base` (prompts stay
  under `seq_length`, where logn / dynamic NTK are inactive).
- `QwenTokenizer` + `make_context`: tiktoken over qwen.tiktoken + QWenTokenizer's specials, prompt
  tokens built as `qwen_generation_utils.make_context` builds them (chatml).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SYSTEM = "You are a helpful assistant."
STOPS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
IMG_SPAN = 256
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
            + ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"])


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the `pytorch_model-*.bin` shards, as float32."""
    state = {}
    for f in sorted(model_dir.glob("pytorch_model*.bin")):
        state |= {k: v.float() for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    return state


def preprocess(image: Image.Image) -> torch.Tensor:
    """Resize((448, 448), BICUBIC) → ToTensor → Normalize(CLIP), as torchvision does it on a PIL image → [1, 3, 448, 448]."""
    arr = np.asarray(image.convert("RGB").resize((448, 448), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return ((x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)).unsqueeze(0)


def abs_pos(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """visual.py `get_abs_pos`: bicubic resize of a square [s*s, C] table to [tokens, C]."""
    src, dst = int(math.sqrt(table.shape[0])), int(math.sqrt(tokens))
    if src == dst:
        return table
    grid = table.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


class ReferenceVisual:
    def __init__(self, model_dir: Path, per_head_split: bool = True, key_pos: bool = True):
        cfg = json.loads((model_dir / "config.json").read_text())["visual"]
        self.heads, self.layers, self.patch = cfg["heads"], cfg["layers"], cfg["patch_size"]
        prefix = "transformer.visual."
        self.w = {k[len(prefix):]: v for k, v in load_state(model_dir).items() if k.startswith(prefix)}
        width, dim = cfg["width"], cfg["output_dim"]
        d = width // self.heads
        if per_head_split:  # head h owns rows [3dh, 3dh+d) = q, [3dh+d, 3dh+2d) = k, [3dh+2d, 3dh+3d) = v
            self.rows = [torch.tensor([3 * d * h + part * d + j for h in range(self.heads) for j in range(d)]) for part in range(3)]
        else:  # the mistake: [Q; K; V] blocks
            self.rows = [torch.arange(part * width, (part + 1) * width) for part in range(3)]
        self.key_pos = key_pos
        self.pool = nn.MultiheadAttention(dim, dim // 128).eval()
        self.pool.load_state_dict({k[len("attn_pool.attn."):]: v for k, v in self.w.items() if k.startswith("attn_pool.attn.")})

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], eps=1e-6)

    def _attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        """x [L, N, C] → [L, N, C]: VisualAttention with q|k|v picked per head from in_proj."""
        L, N, C = x.shape
        h, d = self.heads, C // self.heads
        W, b = self.w[p + "in_proj.weight"], self.w[p + "in_proj.bias"]
        q, k, v = (F.linear(x, W[r], b[r]).reshape(L, N * h, d).transpose(0, 1) for r in self.rows)  # [N*h, L, d]
        probs = torch.softmax(torch.bmm(q / math.sqrt(d), k.transpose(1, 2)), dim=-1)
        ctx = torch.bmm(probs, v).transpose(0, 1).reshape(L, N, C)
        return F.linear(ctx, self.w[p + "out_proj.weight"], self.w[p + "out_proj.bias"])

    def _mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        x = F.gelu(F.linear(x, self.w[p + "c_fc.weight"], self.w[p + "c_fc.bias"]))
        return F.linear(x, self.w[p + "c_proj.weight"], self.w[p + "c_proj.bias"])

    def _resampler(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 1024, C] → [N, 256, D]."""
        pos = self.w["attn_pool.pos_embed"]
        kv = self._ln(x @ self.w["attn_pool.kv_proj.weight"].T, "attn_pool.ln_kv").permute(1, 0, 2)  # [1024, N, D]
        q = self._ln(self.w["attn_pool.query"], "attn_pool.ln_q").unsqueeze(1).repeat(1, x.shape[0], 1) + pos.unsqueeze(1)
        k = kv + abs_pos(pos, kv.shape[0]).unsqueeze(1) if self.key_pos else kv
        return self.pool(q, k, kv, need_weights=False)[0].permute(1, 0, 2)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(pixels.to(self.w["conv1.weight"].dtype), self.w["conv1.weight"], stride=self.patch)  # [N, C, 32, 32]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = self._ln(x + abs_pos(self.w["positional_embedding"], x.shape[1]), "ln_pre").permute(1, 0, 2)  # LND
        for i in range(self.layers):
            p = f"transformer.resblocks.{i}."
            x = x + self._attention(self._ln(x, p + "ln_1"), p + "attn.")
            x = x + self._mlp(self._ln(x, p + "ln_2"), p + "mlp.")
        return self._ln(self._resampler(x.permute(1, 0, 2)), "ln_post") @ self.w["proj"]


_LAYER_RENAMES = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
                  "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.w2.weight": "mlp.gate_proj.weight",
                  "mlp.w1.weight": "mlp.up_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}


def reference_llm(model_dir: Path) -> Qwen2ForCausalLM:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    assert cfg["kv_channels"] * heads == cfg["hidden_size"]
    config = Qwen2Config(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"] // 2,
                         num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
                         rms_norm_eps=cfg["layer_norm_epsilon"], rope_theta=cfg["rotary_emb_base"],
                         max_position_embeddings=cfg["seq_length"], tie_word_embeddings=False, hidden_act="silu")
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config)
    state = {}
    for name, t in load_state(model_dir).items():
        if name.startswith("transformer.visual."):
            continue
        if name.startswith("transformer.h."):
            i, leaf = name[len("transformer.h."):].split(".", 1)
            base = f"model.layers.{i}."
            if leaf.startswith("attn.c_attn."):  # rows [Q; K; V]
                for part, chunk in zip("qkv", t.chunk(3)):
                    state[base + f"self_attn.{part}_proj." + leaf.rsplit(".", 1)[1]] = chunk
            else:
                state[base + _LAYER_RENAMES[leaf]] = t
        else:
            state[{"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
                   "lm_head.weight": "lm_head.weight"}[name]] = t
    model.load_state_dict(state, strict=True)
    return model.eval()


class QwenTokenizer:
    """QWenTokenizer's tiktoken core: ranks from qwen.tiktoken, specials numbered right after them."""

    def __init__(self, model_dir: Path):
        ranks = {}
        for line in (model_dir / "qwen.tiktoken").read_text().splitlines():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        self.special = {t: len(ranks) + k for k, t in enumerate(SPECIALS)}
        self.enc = tiktoken.Encoding("qwen-ref", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special)
        self.eod = self.special["<|endoftext|>"]

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        """skip_special_tokens: ids >= eod (specials, and padded embedding rows) are dropped."""
        return self.enc.decode([i for i in ids if i < self.eod])


def picture_query(n_images: int, question: str) -> str:
    """from_list_format: `Picture k: <img>…</img>\\n` per image, then the text; the span is 256 `<imgpad>` slots."""
    return "".join(f"Picture {k}: <img>{'<imgpad>' * IMG_SPAN}</img>\n" for k in range(1, n_images + 1)) + question


def make_context(tok: QwenTokenizer, query: str, system: str = SYSTEM) -> list[int]:
    """qwen_generation_utils.make_context(chat_format='chatml'), no history: role and content tokenized apart."""
    start, end, nl = [tok.special["<|im_start|>"]], [tok.special["<|im_end|>"]], tok.encode("\n")

    def turn(role: str, content: str) -> list[int]:
        return tok.encode(role) + nl + tok.encode(content)

    return (start + turn("system", system) + end + nl + start + turn("user", query) + end + nl
            + start + tok.encode("assistant") + nl)


@torch.no_grad()
def generate(llm: Qwen2ForCausalLM, tok: QwenTokenizer, ids: list[int], images: torch.Tensor | None, max_new: int) -> list[int]:
    """Greedy from inputs_embeds; the 256 rows after each `<img>` hold that image's features [256, D]."""
    embeds = llm.get_input_embeddings()(torch.tensor([ids]))
    starts = [i for i, t in enumerate(ids) if t == tok.special["<img>"]]
    ends = [i for i, t in enumerate(ids) if t == tok.special["</img>"]]
    assert len(starts) == len(ends) == (0 if images is None else len(images))
    for k, (a, b) in enumerate(zip(starts, ends)):
        assert b - a - 1 == IMG_SPAN
        embeds[0, a + 1:b] = images[k]
    stops = [tok.special[s] for s in STOPS]
    out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=max_new,
                       do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    new = out[0].tolist()
    return new[: next((i for i, t in enumerate(new) if t in stops), len(new)) + 1]
