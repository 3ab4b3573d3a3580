"""Qwen2 LLM of InternVL2-1B (Qwen2-0.5B-Instruct), with its byte-level BPE tokenizer (vocab.json + merges.txt)."""

from __future__ import annotations

from pathlib import Path

from vlmbuild.synth.llm import LlmDims, LlmSynth, head_weight, register
from vlmbuild.synth.vocab import INTERNVL_TOKENS, Added, Vocab, train_byte_bpe, write_added_tokens, write_tokenizer_config
from vlmbuild.synth.weights import Noise, Tensors

BASE_VOCAB = 400  # byte alphabet (256) + merges; the real one has 151643
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_tokenizer(out: Path) -> Vocab:
    # InternVL2-1B ships vocab.json + merges.txt and no tokenizer.json (model-facts §1.3).
    tok = train_byte_bpe(BASE_VOCAB)
    tok.model.save(str(out))
    base = tok.get_vocab_size()
    added = {base + k: Added(c) for k, c in enumerate(CHAT_TOKENS + INTERNVL_TOKENS)}
    fields = {
        "add_prefix_space": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    special_map = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>"}
    write_tokenizer_config(out, added, fields, special_map)
    write_added_tokens(out, added, base)
    return Vocab(size=base + len(added), ids={t.content: tid for tid, t in added.items()})


def config(d: LlmDims, vocab: Vocab, hf_repo: str | None) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": vocab.ids["<|endoftext|>"],
        "eos_token_id": vocab.ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": d.layers,
        "model_type": "qwen2",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,  # InternVLChatConfig forces an untied head for every size
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab.size,
    }


def tensors(d: LlmDims, vocab: int, noise: Noise) -> Tensors:
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    t: Tensors = {"model.embed_tokens.weight": noise.normal(vocab, d.hidden)}
    for i in range(d.layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = noise.linear(q, d.hidden)
        t[p + "self_attn.q_proj.bias"] = noise.bias(q)
        t[p + "self_attn.k_proj.weight"] = noise.linear(kv, d.hidden)
        t[p + "self_attn.k_proj.bias"] = noise.bias(kv)
        t[p + "self_attn.v_proj.weight"] = noise.linear(kv, d.hidden)
        t[p + "self_attn.v_proj.bias"] = noise.bias(kv)
        t[p + "self_attn.o_proj.weight"] = noise.linear(d.hidden, q)  # no bias
        t[p + "mlp.gate_proj.weight"] = noise.linear(d.intermediate, d.hidden)
        t[p + "mlp.up_proj.weight"] = noise.linear(d.intermediate, d.hidden)
        t[p + "mlp.down_proj.weight"] = noise.linear(d.hidden, d.intermediate)
        t[p + "input_layernorm.weight"] = noise.norm(d.hidden)
        t[p + "post_attention_layernorm.weight"] = noise.norm(d.hidden)
    t["model.norm.weight"] = noise.norm(d.hidden)
    t["lm_head.weight"] = head_weight(noise, vocab, d.hidden)
    return t


def generation_config(vocab: Vocab) -> dict:
    return {"bos_token_id": vocab.ids["<|endoftext|>"], "eos_token_id": [vocab.ids["<|im_end|>"], vocab.ids["<|endoftext|>"]],
            "pad_token_id": vocab.ids["<|endoftext|>"], "transformers_version": "4.37.2"}


QWEN2 = register(LlmSynth(family="qwen2", write_tokenizer=write_tokenizer, config=config, tensors=tensors,
                          generation_config=generation_config, first_layer="model.layers.0."))
