"""Every registered LLM family: HF layout → convert → torch backend equals transformers' own model.

References are transformers classes (Qwen2ForCausalLM, LlamaForCausalLM for InternLM2 after the test
packs its weights into `wqkv`, Phi3ForCausalLM with long-rope, Qwen2ForCausalLM for QWen v1 after the
test packs `c_attn`), never vlmbuild code. The registry drives the parametrisation: a family without
a reference builder here fails."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from vlmbuild.llm.convert import convert_checkpoint
from vlmbuild.llm.family import FAMILIES, _load_all
from vlmbuild.llm.torch_runtime import TorchLLM

V, H, I, L, NH, NKV = 251, 64, 96, 2, 4, 2  # odd vocab, GQA
TOL = 2e-4  # float32 logits, max abs difference


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' init (std 0.02) leaves near-tied logits, so greedy tokens would hinge on rounding;
    wider weights give clear argmaxes. Norm weights stay near 1 but differ per channel."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.02 if "bias" in name else 0.12)
    return model


def _internvl_config(llm: dict) -> dict:
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
            "llm_config": llm, "vision_config": {"architectures": ["InternVisionModel"]}}


def _write(root: Path, tensors: dict, config: dict) -> Path:
    root.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(config))
    return root


def ref_qwen2(root: Path):
    model = _spread(Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                                 num_attention_heads=NH, num_key_value_heads=NKV, tie_word_embeddings=False,
                                                 rope_theta=1000000.0)))
    llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "vocab_size": V,
           "rms_norm_eps": model.config.rms_norm_eps, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
           "tie_word_embeddings": False, "hidden_act": "silu"}
    tensors = {f"language_model.{k}": v for k, v in model.state_dict().items()}
    return model, _write(root, tensors, _internvl_config(llm))


def ref_internlm2(root: Path):
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                      num_key_value_heads=NKV, rms_norm_eps=1e-5, rope_theta=1000000.0)
    model = _spread(LlamaForCausalLM(cfg))
    sd, hd, g = model.state_dict(), H // NH, NH // NKV
    out = {"language_model.model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "language_model.model.norm.weight": sd["model.norm.weight"], "language_model.output.weight": sd["lm_head.weight"]}
    for i in range(L):
        p, q = f"model.layers.{i}.", f"language_model.model.layers.{i}."
        # InternLM2 packs q/k/v per kv group: [nkv, g q-heads + k + v, hd, H]
        qw = sd[p + "self_attn.q_proj.weight"].reshape(NKV, g, hd, H)
        kw = sd[p + "self_attn.k_proj.weight"].reshape(NKV, 1, hd, H)
        vw = sd[p + "self_attn.v_proj.weight"].reshape(NKV, 1, hd, H)
        out[q + "attention.wqkv.weight"] = torch.cat([qw, kw, vw], 1).reshape(-1, H)
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "vocab_size": V,
           "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "bias": False,
           "rope_scaling": {"type": "dynamic", "factor": 2.0}, "hidden_act": "silu", "tie_word_embeddings": False}
    return model, _write(root, out, _internvl_config(llm))


def ref_phi3(root: Path):
    short = [1.0 + 0.05 * j for j in range(H // NH // 2)]
    long = [1.5 + 0.3 * j for j in range(H // NH // 2)]
    scaling = {"type": "longrope", "short_factor": short, "long_factor": long}
    cfg = Phi3Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                     num_key_value_heads=NKV, max_position_embeddings=131072, original_max_position_embeddings=4096,
                     rope_scaling=scaling, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _spread(Phi3ForCausalLM(cfg))
    # The original (pre-transformers-5) config layout InternVL2-4B ships.
    llm = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "vocab_size": V,
           "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": 10000.0, "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096, "rope_scaling": {**scaling, "type": "su"}, "hidden_act": "silu",
           "tie_word_embeddings": False}
    tensors = {f"language_model.{k}": v for k, v in model.state_dict().items()}
    return model, _write(root, tensors, _internvl_config(llm))


def ref_qwen(root: Path):
    cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                      num_key_value_heads=NH, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = _spread(Qwen2ForCausalLM(cfg))
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"], "transformer.visual.proj": torch.randn(4, 4)}
    for i in range(L):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.c_attn.{kind}"] = torch.cat([sd[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
        out[q + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]  # QWen: c_proj(w1(x) * silu(w2(x)))
        out[q + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": H, "intermediate_size": 2 * I,
              "num_hidden_layers": L, "num_attention_heads": NH, "kv_channels": H // NH, "vocab_size": V,
              "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "seq_length": 2048, "use_logn_attn": True,
              "use_dynamic_ntk": True, "max_position_embeddings": 8192, "visual": {"image_size": 448}}
    return model, _write(root, out, config)


REFERENCES = {"qwen2": ref_qwen2, "internlm2": ref_internlm2, "phi3": ref_phi3, "qwen": ref_qwen}
_load_all()


def test_every_family_has_a_reference():
    assert set(FAMILIES) == set(REFERENCES), f"families without a parity test: {set(FAMILIES) - set(REFERENCES)}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, family, tp, pp):
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    model, hf_dir = REFERENCES[family](tmp_path / "hf")
    model.eval()
    convert_checkpoint(hf_dir, tmp_path / "trt", dtype="float32", tp_size=tp, pp_size=pp, expect_family=family)
    llm = TorchLLM.load(tmp_path / "trt")
    ids = torch.randint(0, V, (23,)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    diff = (ref - llm.forward_logits(ids)).abs().max().item()
    assert diff <= TOL, f"{family} tp{tp}: max |Δlogits| {diff} > {TOL} (seed {seed})"
    x = torch.tensor([ids])
    model.generation_config.eos_token_id = None  # random weights: never stop early
    with torch.no_grad():  # an explicit mask: else generate masks every input id equal to pad_token_id
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert len(want) == 12
    got = list(llm.generate(ids, max_new_tokens=12))
    assert got == want, f"{family}: greedy tokens differ (seed {seed})"


def test_phi3_long_rope_beyond_original_context(tmp_path):
    """Prompts past original_max_position_embeddings (4096) switch Phi-3 to the long factors."""
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    model, hf_dir = ref_phi3(tmp_path / "hf")
    model.eval()
    convert_checkpoint(hf_dir, tmp_path / "trt", dtype="float32")
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["position_embedding_type"] == "long_rope" and cfg["original_max_position_embeddings"] == 4096
    llm = TorchLLM.load(tmp_path / "trt")
    for n in (4000, 4200):
        ids = torch.randint(0, V, (n,)).tolist()
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -8:]
        diff = (ref - llm.forward_logits(ids)[-8:]).abs().max().item()
        assert diff <= 1e-3, f"phi3 long rope n={n}: max |Δlogits| {diff} (seed {seed})"
