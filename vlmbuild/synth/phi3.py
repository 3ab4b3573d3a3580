"""Phi-3-mini-128k LLM of InternVL2-4B: sentencepiece tokenizer.model + the matching tokenizer.json (model-facts §1.3, §4)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from vlmbuild.synth.llm import LlmDims, LlmSynth, head_weight, register
from vlmbuild.synth.vocab import (INTERNVL_TOKENS, Added, Vocab, sentencepiece_size, train_sentencepiece,
                                  write_added_tokens, write_tokenizer_config)
from vlmbuild.synth.weights import Noise, Tensors

BASE_VOCAB = 500  # sentencepiece pieces; the real model has 32000
CONTROL = ("<unk>", "<s>", "</s>")
# Phi-3's added tokens at 32000..32010, in order; all but <|endoftext|> swallow the whitespace after them.
PHI3_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
               "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")


def write_tokenizer(out: Path) -> Vocab:
    model = train_sentencepiece(BASE_VOCAB, add_dummy_prefix=True)
    (out / "tokenizer.model").write_bytes(model)
    base = sentencepiece_size(model)
    added = {k: Added(c) for k, c in enumerate(CONTROL)}
    added |= {base + k: Added(c, rstrip=c != "<|endoftext|>") for k, c in enumerate(PHI3_TOKENS)}
    added |= {base + len(PHI3_TOKENS) + k: Added(c) for k, c in enumerate(INTERNVL_TOKENS)}
    _tokenizer_json(out / "tokenizer.model", added).save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    fields = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": True,
              "model_max_length": 131072, "padding_side": "left", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False, **specials}
    write_tokenizer_config(out, added, fields, specials)
    write_added_tokens(out, added, base)
    return Vocab(size=base + len(PHI3_TOKENS) + len(INTERNVL_TOKENS), ids={t.content: tid for tid, t in added.items()})


def _tokenizer_json(model_file: Path, added: dict[int, Added]) -> Tokenizer:
    """The Llama-style tokenizer.json equivalent to the sentencepiece model: '▁'-prefixed BPE with byte fallback, BOS."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = Tokenizer(models.BPE(vocab, _merges(sp, vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(a.content, rstrip=a.rstrip, normalized=False, special=a.special)
                            for _, a in sorted(added.items())])
    return tok


def _merges(sp: spm.SentencePieceProcessor, vocab: dict[str, int]) -> list[tuple[str, str]]:
    # A BPE piece is the merge of any two pieces it splits into; rank merges by the merged piece's id
    # (sentencepiece BPE ids follow merge order).
    found = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_byte(pid) or sp.is_unknown(pid):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                found.append((pid, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def config(d: LlmDims, vocab: Vocab, hf_repo: str | None) -> dict:
    half = d.head_dim // 2  # one LongRoPE factor per rotary frequency
    return {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config", "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        "bos_token_id": vocab.ids["<s>"],
        "embd_pdrop": 0.0,
        "eos_token_id": vocab.ids["<|endoftext|>"],
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": 131072,
        "model_type": "phi3",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "original_max_position_embeddings": 4096,
        "pad_token_id": vocab.ids["<|endoftext|>"],
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0 + 0.05 * k for k in range(half)],
            "long_factor": [1.0 + 4.0 * k for k in range(half)],
        },
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab.size,
    }


def tensors(d: LlmDims, vocab: int, noise: Noise) -> Tensors:
    qkv = (d.heads + 2 * d.kv_heads) * d.head_dim  # contiguous [Q | K | V]
    t: Tensors = {"model.embed_tokens.weight": noise.normal(vocab, d.hidden)}
    for i in range(d.layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.qkv_proj.weight"] = noise.linear(qkv, d.hidden)
        t[p + "self_attn.o_proj.weight"] = noise.linear(d.hidden, d.heads * d.head_dim)
        t[p + "mlp.gate_up_proj.weight"] = noise.linear(2 * d.intermediate, d.hidden)  # [gate; up]
        t[p + "mlp.down_proj.weight"] = noise.linear(d.hidden, d.intermediate)
        t[p + "input_layernorm.weight"] = noise.norm(d.hidden)
        t[p + "post_attention_layernorm.weight"] = noise.norm(d.hidden)
    t["model.norm.weight"] = noise.norm(d.hidden)
    t["lm_head.weight"] = head_weight(noise, vocab, d.hidden)
    return t


def generation_config(vocab: Vocab) -> dict:
    ids = vocab.ids
    return {"bos_token_id": ids["<s>"], "eos_token_id": [ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"]],
            "pad_token_id": ids["<|endoftext|>"], "transformers_version": "4.37.2"}


PHI3 = register(LlmSynth(family="phi3", write_tokenizer=write_tokenizer, config=config, tensors=tensors,
                         generation_config=generation_config, first_layer="model.layers.0."))
