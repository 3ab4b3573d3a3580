"""`vlmbuild synth`: every recipe's tiny checkpoint has the original HF layout, non-trivial weights, atomic writes.

Expected key names and shapes are written here from docs/model-facts.md §1.3 / §2.1, not taken from
synth's tables. The Qwen2 and Phi-3 LLM halves are loaded into transformers' own classes as the reference.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.recipe import load_recipe, recipe_names
from vlmbuild.synth import synth_checkpoint
from vlmbuild.tokenizer import load_tokenizer

# model-facts §1.3: InternViT per-layer tensors; the variant decides biases and qk-norm.
VIT_LAYER = ["attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias", "norm1.weight", "norm2.weight", "ls1", "ls2"]
VIT_300M_EXTRA = ["attn.qkv.bias", "norm1.bias", "norm2.bias"]  # LayerNorm + qkv bias
VIT_6B_EXTRA = ["attn.q_norm.weight", "attn.k_norm.weight"]  # RMSNorm, qk-norm, no qkv bias
LLM_KEYS = {  # (global keys, per-layer keys) of the stand-alone CausalLM, under `language_model.`
    "Qwen2ForCausalLM": (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
                         [f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")]
                         + ["self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                            "input_layernorm.weight", "post_attention_layernorm.weight"]),
    "InternLM2ForCausalLM": (["model.tok_embeddings.weight", "model.norm.weight", "output.weight"],
                             ["attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight",
                              "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"]),
    "Phi3ForCausalLM": (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
                        ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                         "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]),
}
TOKENIZER_FILES = {  # files that must / must not exist, per LLM (model-facts §1.3)
    "Qwen2ForCausalLM": ({"vocab.json", "merges.txt"}, {"tokenizer.json", "tokenizer.model"}),
    "InternLM2ForCausalLM": ({"tokenizer.model", "added_tokens.json"}, {"tokenizer.json"}),
    "Phi3ForCausalLM": ({"tokenizer.model", "tokenizer.json"}, set()),
}


INTERNVL = [n for n in recipe_names() if load_recipe(n).vision == "intern_vit"]
QWEN_VL = [n for n in recipe_names() if load_recipe(n).vision == "qwen_vit"]
# model-facts §5.2 / §5.3: Qwen-VL-Chat keys (global, per LLM layer, per ViT block, visual globals).
QWEN_LLM = (["transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"],
            ["ln_1.weight", "ln_2.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight"])
QWEN_VIT_BLOCK = [f"{m}.{w}" for m in ("ln_1", "ln_2", "attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
                  for w in ("weight", "bias")]
QWEN_VISUAL = ["conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias",
               "proj", "attn_pool.query", "attn_pool.pos_embed", "attn_pool.kv_proj.weight", "attn_pool.attn.in_proj_weight",
               "attn_pool.attn.in_proj_bias", "attn_pool.attn.out_proj.weight", "attn_pool.attn.out_proj.bias",
               "attn_pool.ln_q.weight", "attn_pool.ln_q.bias", "attn_pool.ln_kv.weight", "attn_pool.ln_kv.bias"]


def test_every_recipe_has_a_layout_test():
    assert sorted(INTERNVL + QWEN_VL) == recipe_names()


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per recipe, made lazily and shared by this module's tests."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = synth_checkpoint(load_recipe(name), tmp_path_factory.mktemp(name) / "hf", seed=0)
        return made[name]

    return get


def expected_keys(cfg: dict) -> set[str]:
    v, llm = cfg["vision_config"], cfg["llm_config"]
    keys = {"vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.patch_embedding.bias", "vision_model.embeddings.position_embedding"}
    layer = VIT_LAYER + (VIT_6B_EXTRA if v["norm_type"] == "rms_norm" else VIT_300M_EXTRA)
    keys |= {f"vision_model.encoder.layers.{i}.{k}" for i in range(v["num_hidden_layers"]) for k in layer}
    keys |= {f"mlp1.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")}
    glob, per_layer = LLM_KEYS[llm["architectures"][0]]
    keys |= {f"language_model.{k}" for k in glob}
    keys |= {f"language_model.model.layers.{i}.{k}" for i in range(llm["num_hidden_layers"]) for k in per_layer}
    return keys


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    v, llm = cfg["vision_config"], cfg["llm_config"]
    c, i, d, vocab = v["hidden_size"], v["intermediate_size"], llm["hidden_size"], llm["vocab_size"]
    hd = d // llm["num_attention_heads"]
    q, kv, inter = llm["num_attention_heads"] * hd, llm["num_key_value_heads"] * hd, llm["intermediate_size"]
    return {
        "vision_model.embeddings.position_embedding": (1, 1025, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, 14, 14),
        "vision_model.encoder.layers.0.attn.qkv.weight": (3 * c, c),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (i, c),
        "vision_model.encoder.layers.1.ls2": (c,),
        "mlp1.0.weight": (4 * c,),
        "mlp1.1.weight": (d, 4 * c),
        "mlp1.3.weight": (d, d),
        "Qwen2ForCausalLM": {"language_model.model.layers.1.self_attn.k_proj.weight": (kv, d),
                             "language_model.model.layers.0.mlp.down_proj.weight": (d, inter),
                             "language_model.lm_head.weight": (vocab, d)},
        "InternLM2ForCausalLM": {"language_model.model.layers.1.attention.wqkv.weight": (q + 2 * kv, d),
                                 "language_model.model.layers.0.feed_forward.w2.weight": (d, inter),
                                 "language_model.output.weight": (vocab, d)},
        "Phi3ForCausalLM": {"language_model.model.layers.1.self_attn.qkv_proj.weight": (q + 2 * kv, d),
                            "language_model.model.layers.0.mlp.gate_up_proj.weight": (2 * inter, d),
                            "language_model.lm_head.weight": (vocab, d)},
    }


def read_all(path: Path) -> tuple[dict, dict[str, str], dict[str, torch.Tensor]]:
    """(index json, tensor → file, tensors) read from the shard files themselves."""
    tensors, where = {}, {}
    if (path / "pytorch_model.bin.index.json").is_file():
        index = json.loads((path / "pytorch_model.bin.index.json").read_text())
        for f in sorted(path.glob("pytorch_model-*.bin")):
            for k, t in torch.load(f, weights_only=True).items():
                tensors[k], where[k] = t, f.name
        return index, where, tensors
    index = json.loads((path / "model.safetensors.index.json").read_text())
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                tensors[k], where[k] = st.get_tensor(k), f.name
    return index, where, tensors


@pytest.mark.parametrize("name", INTERNVL)
def test_layout_keys_shapes_and_config(synthesized, name):
    path = synthesized(name)
    cfg = json.loads((path / "config.json").read_text())
    index, where, tensors = read_all(path)
    assert index["weight_map"] == where, "index must name exactly the tensors each shard holds"
    assert sorted(set(where.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(tensors) == expected_keys(cfg), set(tensors) ^ expected_keys(cfg)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    layer0 = {f for k, f in where.items() if ".layers.0." in k and k.startswith("language_model.")}
    assert len(layer0) == 2, "one LLM layer should span both shards"

    arch = cfg["llm_config"]["architectures"][0]
    shapes = expected_shapes(cfg)
    shapes |= shapes.pop(arch)
    for other in LLM_KEYS:
        shapes.pop(other, None)
    assert {k: tuple(tensors[k].shape) for k in shapes} == shapes

    must, must_not = TOKENIZER_FILES[arch]
    files = {p.name for p in path.iterdir()}
    assert must <= files and not (must_not & files), files
    assert {"generation_config.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert not any(f.endswith(".py") for f in files)


@pytest.mark.parametrize("name", INTERNVL)
def test_config_reads_and_matches_tokenizer(synthesized, name):
    path = synthesized(name)
    recipe = load_recipe(name)
    ckpt = HfCheckpoint(path)
    c = ckpt.config
    assert (c.architectures, c.model_type, c.template) == (["InternVLChatModel"], "internvl_chat", recipe.template)
    assert (c.force_image_size, c.downsample_ratio, c.ps_version, c.select_layer) == (448, 0.5, "v2", -1)
    assert (c.dynamic_image_size, c.use_thumbnail, c.min_dynamic_patch, c.max_dynamic_patch) == (True, True, 1, 12)
    v = c.vision
    assert (v["image_size"], v["patch_size"], v["model_type"]) == (448, 14, "intern_vit_6b")
    assert v["hidden_size"] % v["num_attention_heads"] == 0
    six_b = recipe.layout_repo == "OpenGVLab/InternVL2-26B"  # model-facts §2.1: only 26B has the 6B ViT
    assert (v["norm_type"], v["qkv_bias"], v["qk_normalization"]) == (
        ("rms_norm", False, True) if six_b else ("layer_norm", True, False))
    assert c.llm["tie_word_embeddings"] is False
    assert c.llm["vocab_size"] == load_tokenizer(path).vocab_size
    assert sorted(ckpt.names()) == sorted(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.mark.parametrize("name", ["tiny-internvl2-1b", "internvl2-26b"])
def test_weights_are_non_trivial(synthesized, name):
    _, _, t = read_all(synthesized(name))
    ls = [t[f"vision_model.encoder.layers.{i}.{s}"].float() for i in range(2) for s in ("ls1", "ls2")]
    assert all(x.unique().numel() > x.numel() // 2 for x in ls), "layer-scale channels must mostly differ (bf16 may tie a few)"
    assert all(not torch.equal(a, b) for k, a in enumerate(ls) for b in ls[k + 1:]), "ls1/ls2 must differ across layers"
    norms = [x.float() for k, x in t.items() if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight"))]
    assert norms and all(0.5 < x.mean() < 1.5 and x.std() > 0.02 for x in norms), "norm weights should be 1 + noise"
    biases = [x.float() for k, x in t.items() if k.endswith(".bias")]
    assert biases and all(x.abs().mean() > 0.01 for x in biases), "biases must be non-zero"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    recipe = load_recipe("tiny-internvl2-1b")
    a, b, c = (synth_checkpoint(recipe, tmp_path / n, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    shard = "model-00002-of-00002.safetensors"
    assert (a / shard).read_bytes() == (b / shard).read_bytes()
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


@pytest.mark.parametrize("name,cls", [("tiny-internvl2-1b", "Qwen2ForCausalLM"), ("internvl2-4b", "Phi3ForCausalLM")])
def test_llm_half_loads_into_transformers(synthesized, name, cls):
    import transformers

    seed = random.randrange(2**31)
    ckpt = HfCheckpoint(synthesized(name))
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    model = getattr(transformers, cls)(config_cls(**ckpt.config.llm)).eval()
    state = dict(ckpt.iter_prefix("language_model."))
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    ids = torch.randint(0, ckpt.config.llm["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model.float()(ids).logits[0]
    assert logits.isfinite().all(), f"seed {seed}"
    top2 = logits.topk(2).values
    # Untied, well-scaled head: the greedy choice is clear at bf16 precision (gap > 0.05 logits).
    assert (top2[:, 0] - top2[:, 1]).median() > 0.05 and 1.0 < logits.std() < 10.0, f"seed {seed}: {top2}"


def test_failure_leaves_previous_output_untouched(tmp_path, monkeypatch):
    import vlmbuild.synth.internvl as internvl

    out = tmp_path / "hf"
    out.mkdir()
    (out / "marker").write_text("previous good checkpoint")

    def half_written(path: Path, tensors, cut: int) -> None:
        (path / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(internvl, "write_safetensors_shards", half_written)
    with pytest.raises(OSError, match="disk full"):
        synth_checkpoint(load_recipe("tiny-internvl2-1b"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "no temporary sibling may remain"
    assert sorted(p.name for p in out.iterdir()) == ["marker"]

    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        synth_checkpoint(load_recipe("tiny-internvl2-1b"), fresh)
    assert not fresh.exists()


@pytest.mark.parametrize("name", QWEN_VL)
def test_qwen_vl_layout(synthesized, name):
    path = synthesized(name)
    cfg = json.loads((path / "config.json").read_text())
    index, where, t = read_all(path)
    assert index["weight_map"] == where
    assert sorted(set(where.values())) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert len({f for k, f in where.items() if k.startswith("transformer.h.0.")}) == 2
    glob, per_layer = QWEN_LLM
    want = set(glob) | {f"transformer.h.{i}.{k}" for i in range(cfg["num_hidden_layers"]) for k in per_layer}
    vis = cfg["visual"]
    want |= {f"transformer.visual.{k}" for k in QWEN_VISUAL}
    want |= {f"transformer.visual.transformer.resblocks.{i}.{k}" for i in range(vis["layers"]) for k in QWEN_VIT_BLOCK}
    assert set(t) == want, set(t) ^ want
    d, w, e, mlp = cfg["hidden_size"], vis["width"], vis["output_dim"], int(vis["width"] * vis["mlp_ratio"])
    assert e == d and e // 128 >= 1, "resampler heads = output_dim // 128"
    shapes = {"transformer.h.0.attn.c_attn.weight": (3 * d, d), "transformer.h.1.mlp.w2.weight": (cfg["intermediate_size"] // 2, d),
              "transformer.visual.conv1.weight": (w, 3, 14, 14), "transformer.visual.positional_embedding": (256, w),
              "transformer.visual.transformer.resblocks.0.attn.in_proj.weight": (3 * w, w),
              "transformer.visual.transformer.resblocks.1.mlp.c_fc.weight": (mlp, w),
              "transformer.visual.attn_pool.kv_proj.weight": (e, w), "transformer.visual.attn_pool.query": (256, e),
              "transformer.visual.proj": (e, e), "lm_head.weight": (cfg["vocab_size"], d)}
    assert {k: tuple(t[k].shape) for k in shapes} == shapes
    tok = load_tokenizer(path)
    assert cfg["vocab_size"] >= tok.vocab_size and cfg["vocab_size"] % 128 == 0  # padded like 151936 ≥ 151860
    assert vis["image_start_id"] == tok.token_to_id("<img>")
    assert {p.name for p in path.iterdir()} >= {"qwen.tiktoken", "tokenizer_config.json", "generation_config.json"}
    assert HfCheckpoint(path).config.llm_architecture == "QWenLMHeadModel"


@pytest.mark.parametrize("name", QWEN_VL)
def test_qwen_llm_half_runs_as_qwen2(synthesized, name):
    """model-facts §5.3: below seq_length QWen v1 is a Qwen2 decoder with KV = heads once c_attn is split."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    seed = random.randrange(2**31)
    ckpt = HfCheckpoint(synthesized(name))
    hf = ckpt.config.llm
    d = hf["hidden_size"]
    state = {"model.embed_tokens.weight": ckpt.get("transformer.wte.weight"), "model.norm.weight": ckpt.get("transformer.ln_f.weight"),
             "lm_head.weight": ckpt.get("lm_head.weight")}
    for i in range(hf["num_hidden_layers"]):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for part, w, b in zip("qkv", ckpt.get(src + "attn.c_attn.weight").split(d), ckpt.get(src + "attn.c_attn.bias").split(d)):
            state |= {dst + f"self_attn.{part}_proj.weight": w, dst + f"self_attn.{part}_proj.bias": b}
        state |= {dst + "self_attn.o_proj.weight": ckpt.get(src + "attn.c_proj.weight"),
                  dst + "mlp.gate_proj.weight": ckpt.get(src + "mlp.w2.weight"),  # w2 is the activated branch
                  dst + "mlp.up_proj.weight": ckpt.get(src + "mlp.w1.weight"),
                  dst + "mlp.down_proj.weight": ckpt.get(src + "mlp.c_proj.weight"),
                  dst + "input_layernorm.weight": ckpt.get(src + "ln_1.weight"),
                  dst + "post_attention_layernorm.weight": ckpt.get(src + "ln_2.weight")}
    cfg = Qwen2Config(hidden_size=d, num_attention_heads=hf["num_attention_heads"], num_key_value_heads=hf["num_attention_heads"],
                      num_hidden_layers=hf["num_hidden_layers"], intermediate_size=hf["intermediate_size"] // 2,
                      vocab_size=hf["vocab_size"], rms_norm_eps=hf["layer_norm_epsilon"], tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    ids = torch.randint(0, hf["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model.float()(ids).logits
    assert logits.isfinite().all() and 1.0 < logits.std() < 10.0, f"seed {seed}"
