"""InternLM2 LLM of InternVL2-2B/8B/26B, with its sentencepiece tokenizer.model (model-facts §1.2, §1.3, §4)."""

from __future__ import annotations

from pathlib import Path

from vlmbuild.synth.llm import LlmDims, LlmSynth, head_weight, register
from vlmbuild.synth.vocab import (INTERNVL_TOKENS, Added, Vocab, sentencepiece_size, train_sentencepiece,
                                  write_added_tokens, write_tokenizer_config)
from vlmbuild.synth.weights import Noise, Tensors

BASE_VOCAB = 600  # sentencepiece pieces before the chat tokens; the real model has 92538
# The last six pieces of InternLM2's sentencepiece vocabulary (92538..92543), in order.
CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
CONTROL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
# Per-size LLM config fields that differ from internlm2-chat-1_8b / internlm2_5-7b-chat.
REPO_OVERRIDES = {"OpenGVLab/InternVL2-26B": {"rope_scaling": {"type": "dynamic", "factor": 3.0}}}


def write_tokenizer(out: Path) -> Vocab:
    model = train_sentencepiece(BASE_VOCAB, add_dummy_prefix=True, tail_pieces=CHAT_TOKENS)
    (out / "tokenizer.model").write_bytes(model)
    base = sentencepiece_size(model)
    added = {k: Added(c) for k, c in enumerate(CONTROL)}
    added |= {base - len(CHAT_TOKENS) + k: Added(c) for k, c in enumerate(CHAT_TOKENS)}
    added |= {base + k: Added(c) for k, c in enumerate(INTERNVL_TOKENS)}
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    fields = {
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": list(CHAT_TOKENS[::-1]),
        # The tokenizer class is remote code in the real repo; vlmbuild never imports it.
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "model_max_length": 1000000000000000019884624838656,
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        **specials,
    }
    write_tokenizer_config(out, added, fields, {**specials, "additional_special_tokens": list(CHAT_TOKENS[::-1])})
    write_added_tokens(out, added, base)
    return Vocab(size=base + len(INTERNVL_TOKENS), ids={t.content: tid for tid, t in added.items()})


def config(d: LlmDims, vocab: Vocab, hf_repo: str | None) -> dict:
    cfg = {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "bos_token_id": vocab.ids["<s>"],
        "eos_token_id": vocab.ids["</s>"],
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": 32768,
        "model_type": "internlm2",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "pad_token_id": vocab.ids["</s>"],
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab.size,
    }
    return cfg | REPO_OVERRIDES.get(hf_repo or "", {})


def tensors(d: LlmDims, vocab: int, noise: Noise) -> Tensors:
    qkv = (d.heads + 2 * d.kv_heads) * d.head_dim  # wqkv rows grouped per kv head: (kv, q_per_kv + 2, head_dim)
    t: Tensors = {"model.tok_embeddings.weight": noise.normal(vocab, d.hidden)}
    for i in range(d.layers):
        p = f"model.layers.{i}."
        t[p + "attention.wqkv.weight"] = noise.linear(qkv, d.hidden)
        t[p + "attention.wo.weight"] = noise.linear(d.hidden, d.heads * d.head_dim)
        t[p + "feed_forward.w1.weight"] = noise.linear(d.intermediate, d.hidden)  # gate (activated)
        t[p + "feed_forward.w3.weight"] = noise.linear(d.intermediate, d.hidden)  # up
        t[p + "feed_forward.w2.weight"] = noise.linear(d.hidden, d.intermediate)  # down
        t[p + "attention_norm.weight"] = noise.norm(d.hidden)
        t[p + "ffn_norm.weight"] = noise.norm(d.hidden)
    t["model.norm.weight"] = noise.norm(d.hidden)
    t["output.weight"] = head_weight(noise, vocab, d.hidden)
    return t


def generation_config(vocab: Vocab) -> dict:
    return {"bos_token_id": vocab.ids["<s>"], "eos_token_id": [vocab.ids["</s>"], vocab.ids["<|im_end|>"]],
            "pad_token_id": vocab.ids["</s>"], "transformers_version": "4.37.2"}


INTERNLM2 = register(LlmSynth(family="internlm2", write_tokenizer=write_tokenizer, config=config, tensors=tensors,
                              generation_config=generation_config, first_layer="model.layers.0."))
