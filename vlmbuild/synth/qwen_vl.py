"""The Qwen-VL-Chat layout: flat `QWenLMHeadModel` config with `visual`, `transformer.*` keys in
`pytorch_model-*.bin` shards, and the tiktoken `qwen.tiktoken` (model-facts §5).
"""

from __future__ import annotations

import base64
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

from vlmbuild.fsutil import write_json
from vlmbuild.recipe import Recipe
from vlmbuild.synth.llm import head_weight
from vlmbuild.synth.vocab import train_byte_bpe
from vlmbuild.synth.weights import Noise, Tensors, finish, split_point, write_bin_shards
from vlmbuild.tokenizer import QWEN_SPECIALS

# Tiny dims. The resampler has output_dim // 128 heads (QWen's visual.py), so the LLM width is 256 → 2 heads.
HIDDEN, HEADS, LAYERS, INTERMEDIATE = 256, 8, 2, 512  # intermediate_size is w1 + w2: each is 256 wide
WIDTH, VIT_HEADS, VIT_LAYERS, MLP_RATIO = 48, 4, 2, 2.6667  # int(48 * 2.6667) = 128 like int(1664 * 4.9231) = 8192
GRID, PATCH, IMAGE_SIZE = 16, 14, 448  # 256 learned queries; 32 × 32 patches
BASE_VOCAB = 400
VOCAB_ROUND = 128  # the real embedding has 151936 rows for 151860 tokens


def write_qwen_vl(recipe: Recipe, out: Path, seed: int) -> None:
    n_tokens = _write_tiktoken(out / "qwen.tiktoken")
    ids = {t: n_tokens - len(QWEN_SPECIALS) + k for k, t in enumerate(QWEN_SPECIALS)}
    vocab = -(-n_tokens // VOCAB_ROUND) * VOCAB_ROUND
    write_json(out / "config.json", _config(vocab, ids["<img>"]))
    write_json(out / "generation_config.json", {
        "chat_format": "chatml", "do_sample": True, "eos_token_id": ids["<|endoftext|>"], "max_new_tokens": 512,
        "max_window_size": 6144, "pad_token_id": ids["<|endoftext|>"], "top_k": 0, "top_p": 0.3,
        "transformers_version": "4.31.0"})
    write_json(out / "tokenizer_config.json", {
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer"})
    tensors = finish(_tensors(vocab, Noise(seed)), torch.bfloat16)
    write_bin_shards(out, tensors, split_point(list(tensors), "transformer.h.0."))


def _write_tiktoken(path: Path) -> int:
    """`base64(bytes) rank` lines: the 256 single bytes at ranks 0..255 (QWenTokenizer writes image paths as
    ids = byte values), then the trained merges. Returns the tokenizer length, specials included."""
    byte_of = {ch: _byte_value(ch) for ch in pre_tokenizers.ByteLevel.alphabet()}
    trained = train_byte_bpe(BASE_VOCAB).get_vocab()
    merged = [bytes(byte_of[c] for c in tok) for tok, _ in sorted(trained.items(), key=lambda kv: kv[1]) if len(tok) > 1]
    ranks = [bytes([b]) for b in range(256)] + merged
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(ranks)))
    return len(ranks) + len(QWEN_SPECIALS)


def _byte_value(ch: str) -> int:
    # GPT-2 byte→character map: printable bytes keep their code point, the rest map to 256 + k in byte order.
    code = ord(ch)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    return code if code in printable else sorted(set(range(256)) - set(printable))[code - 256]


def _config(vocab: int, img_id: int) -> dict:
    return {
        "architectures": ["QWenLMHeadModel"],
        "attn_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "bf16": False, "fp16": False, "fp32": False,
        "emb_dropout_prob": 0.0,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "kv_channels": HIDDEN // HEADS,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "visual": {"heads": VIT_HEADS, "image_size": IMAGE_SIZE, "image_start_id": img_id, "layers": VIT_LAYERS,
                   "mlp_ratio": MLP_RATIO, "output_dim": HIDDEN, "patch_size": PATCH, "width": WIDTH},
        "vocab_size": vocab,
    }


def _tensors(vocab: int, noise: Noise) -> Tensors:
    ff = INTERMEDIATE // 2
    t: Tensors = {"transformer.wte.weight": noise.normal(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        t[p + "ln_1.weight"] = noise.norm(HIDDEN)
        t[p + "attn.c_attn.weight"] = noise.linear(3 * HIDDEN, HIDDEN)  # contiguous [Q; K; V]
        t[p + "attn.c_attn.bias"] = noise.bias(3 * HIDDEN)
        t[p + "attn.c_proj.weight"] = noise.linear(HIDDEN, HIDDEN)
        t[p + "ln_2.weight"] = noise.norm(HIDDEN)
        t[p + "mlp.w1.weight"] = noise.linear(ff, HIDDEN)  # up
        t[p + "mlp.w2.weight"] = noise.linear(ff, HIDDEN)  # gate (activated)
        t[p + "mlp.c_proj.weight"] = noise.linear(HIDDEN, ff)
    t["transformer.ln_f.weight"] = noise.norm(HIDDEN)
    t |= _visual(noise)
    t["lm_head.weight"] = head_weight(noise, vocab, HIDDEN)
    return t


def _visual(noise: Noise) -> Tensors:
    v, w, mlp = "transformer.visual.", WIDTH, int(WIDTH * MLP_RATIO)
    t: Tensors = {
        v + "positional_embedding": noise.normal(GRID * GRID, w, std=0.3),  # 16 × 16, resized to 32 × 32 at run time
        v + "proj": noise.linear(HIDDEN, HIDDEN),  # used as x @ proj
        v + "conv1.weight": noise.linear(w, 3 * PATCH * PATCH).view(w, 3, PATCH, PATCH),  # no bias
        v + "ln_pre.weight": noise.norm(w), v + "ln_pre.bias": noise.bias(w),
        v + "ln_post.weight": noise.norm(HIDDEN), v + "ln_post.bias": noise.bias(HIDDEN),
    }
    for i in range(VIT_LAYERS):
        p = f"{v}transformer.resblocks.{i}."
        t |= {p + "ln_1.weight": noise.norm(w), p + "ln_1.bias": noise.bias(w)}
        t |= {p + "attn.in_proj.weight": noise.linear(3 * w, w), p + "attn.in_proj.bias": noise.bias(3 * w)}  # per-head q|k|v
        t |= {p + "attn.out_proj.weight": noise.linear(w, w), p + "attn.out_proj.bias": noise.bias(w)}
        t |= {p + "ln_2.weight": noise.norm(w), p + "ln_2.bias": noise.bias(w)}
        t |= {p + "mlp.c_fc.weight": noise.linear(mlp, w), p + "mlp.c_fc.bias": noise.bias(mlp)}
        t |= {p + "mlp.c_proj.weight": noise.linear(w, mlp), p + "mlp.c_proj.bias": noise.bias(w)}
    a = v + "attn_pool."
    t |= {a + "query": noise.normal(GRID * GRID, HIDDEN, std=0.5), a + "pos_embed": noise.normal(GRID * GRID, HIDDEN, std=0.3)}
    t[a + "kv_proj.weight"] = noise.linear(HIDDEN, w)  # width → output_dim, no bias
    t |= {a + "attn.in_proj_weight": noise.linear(3 * HIDDEN, HIDDEN), a + "attn.in_proj_bias": noise.bias(3 * HIDDEN)}
    t |= {a + "attn.out_proj.weight": noise.linear(HIDDEN, HIDDEN), a + "attn.out_proj.bias": noise.bias(HIDDEN)}
    t |= {a + "ln_q.weight": noise.norm(HIDDEN), a + "ln_q.bias": noise.bias(HIDDEN)}
    t |= {a + "ln_kv.weight": noise.norm(HIDDEN), a + "ln_kv.bias": noise.bias(HIDDEN)}
    return t
