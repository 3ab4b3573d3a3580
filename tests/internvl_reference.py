"""Independent reference for end-to-end tests: transformers' own InternVLForConditionalGeneration,
built from a checkpoint in the *original* InternVL2 layout by renaming its tensors here (rules:
model-facts §7 / transformers' convert_internvl_weights_to_hf.py), plus GotOcr2ImageProcessorPil
for tiling. Nothing here imports vlmbuild."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"

_VISION_RENAMES = [  # applied in order to names after the `vision_model.` prefix
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^encoder\.layers\.", "encoder.layer."),
    (r"\.ls1$", ".lambda_1"),
    (r"\.ls2$", ".lambda_2"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def _rename_vision(name: str, t: torch.Tensor, out: dict) -> None:
    for pat, rep in _VISION_RENAMES:
        name = re.sub(pat, rep, name)
    if ".attention.qkv." in name:  # rows [Q; K; V]
        for part, chunk in zip("qkv", t.chunk(3, dim=0)):
            out["model.vision_tower." + name.replace(".qkv.", f".{part}_proj.")] = chunk
    else:
        out["model.vision_tower." + name] = t


_LLM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act")


def _text_config(llm: dict):
    """transformers' config for the LLM half. InternLM2 is a Llama once wqkv is unpacked; its dynamic
    NTK rope_scaling only acts beyond max_position_embeddings, which these prompts never reach."""
    arch = llm["architectures"][0]
    common = {k: llm[k] for k in _LLM_KEYS if k in llm} | {"tie_word_embeddings": False}
    if arch == "Qwen2ForCausalLM":
        return Qwen2Config(**common, rope_theta=llm.get("rope_theta", 1000000.0))
    if arch == "InternLM2ForCausalLM":
        return LlamaConfig(**common, rope_theta=llm.get("rope_theta", 10000.0), attention_bias=llm.get("bias", False))
    if arch == "Phi3ForCausalLM":
        return Phi3Config(**common, rope_theta=llm.get("rope_theta", 10000.0), rope_scaling=llm.get("rope_scaling"),
                          original_max_position_embeddings=llm.get("original_max_position_embeddings"),
                          pad_token_id=None, bos_token_id=None, eos_token_id=None)
    raise NotImplementedError(arch)


_INTERNLM2_RENAMES = [("tok_embeddings", "embed_tokens"), ("attention.wo", "self_attn.o_proj"),
                      ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                      ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
                      ("ffn_norm", "post_attention_layernorm")]


def _rename_llm(name: str, t: torch.Tensor, llm: dict, out: dict) -> None:
    name = name.replace("language_model.lm_head.", "lm_head.").replace("language_model.output.", "lm_head.")
    name = name.replace("language_model.model.", "model.language_model.")
    if llm["architectures"][0] == "InternLM2ForCausalLM":
        for a, b in _INTERNLM2_RENAMES:
            name = name.replace(a, b)
        if name.endswith("attention.wqkv.weight"):  # rows grouped per kv head: g queries, k, v
            nh, nkv = llm["num_attention_heads"], llm["num_key_value_heads"]
            hd, g = llm["hidden_size"] // nh, nh // nkv
            w = t.reshape(nkv, g + 2, hd, -1)
            base = name.replace("attention.wqkv.weight", "self_attn.")
            out[base + "q_proj.weight"] = w[:, :g].reshape(nh * hd, -1)
            out[base + "k_proj.weight"] = w[:, g].reshape(nkv * hd, -1)
            out[base + "v_proj.weight"] = w[:, g + 1].reshape(nkv * hd, -1)
            return
    out[name] = t


def load_reference(model_dir: Path, image_token_id: int) -> InternVLForConditionalGeneration:
    raw = json.loads((model_dir / "config.json").read_text())
    vc = raw["vision_config"]
    vision = InternVLVisionConfig(
        hidden_size=vc["hidden_size"], num_hidden_layers=vc["num_hidden_layers"], num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"], attention_bias=vc["qkv_bias"], use_qk_norm=vc["qk_normalization"],
        norm_type=vc["norm_type"], layer_norm_eps=vc["layer_norm_eps"], image_size=vc["image_size"], patch_size=vc["patch_size"],
        hidden_act=vc["hidden_act"], use_absolute_position_embeddings=True, use_mean_pooling=True)
    llm = raw["llm_config"]
    cfg = InternVLConfig(vision_config=vision.to_dict(), text_config=_text_config(llm).to_dict(),
                         image_token_id=image_token_id, downsample_ratio=raw["downsample_ratio"],
                         projector_hidden_act="gelu", vision_feature_layer=raw["select_layer"],
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(cfg)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, t in load_file(f).items():
            t = t.float()
            if name.startswith("vision_model."):
                _rename_vision(name[len("vision_model."):], t, state)
            elif name.startswith("mlp1."):
                idx, leaf = name[len("mlp1."):].split(".", 1)
                state[f"model.multi_modal_projector.{_PROJECTOR[idx]}.{leaf}"] = t
            else:
                _rename_llm(name, t, llm, state)
    model.load_state_dict(state, strict=True)
    # InternVL forces an untied head; a tied reference would silently share one of the two tensors.
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    return model.eval()


def pixel_values(images, max_patches: int = 12) -> tuple[torch.Tensor, list[int]]:
    """Tiles as transformers' GOT-OCR2 processor cuts them (same grid search as InternVL)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=max_patches,
                                    size={"height": 448, "width": 448}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    out = proc(images=images, return_tensors="pt")
    return out["pixel_values"].float(), out["num_patches"].tolist()


def image_tokens(n_tiles: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * 256 * n_tiles + "</img>"


# InternVL conversation.py templates (MPT style: no newline after the separator): system, user role,
# assistant role, separator; and the stop tokens of the release templates / chat().
TEMPLATES = {
    "Hermes-2": ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "internlm2-chat": ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "phi3-chat": ("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>"),
}
STOPS = {"Hermes-2": ("<|im_end|>", "<|endoftext|>"), "internlm2-chat": ("<|im_end|>", "<|im_start|>", "</s>"),
         "phi3-chat": ("<|end|>", "<|endoftext|>", "</s>")}


def chat_prompt(template: str, turns: list[tuple[str, str | None]], system: str = SYSTEM) -> str:
    sys_role, user, assistant_role, sep = TEMPLATES[template]
    out = f"{sys_role}{system}{sep}"
    for question, answer in turns:
        out += f"{user}{question}{sep}{assistant_role}"
        if answer:  # MPT style: an empty message renders as its role alone, with no separator
            out += f"{answer}{sep}"
    return out


class SentencePieceReference:
    """InternLM2's tokenizer form without its remote code: split on the added tokens declared in
    tokenizer_config.json, sentencepiece for the rest, `<s>` in front (add_bos_token)."""

    def __init__(self, model_dir: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
        self.added = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
        self.split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.added[token] if token in self.added else self.sp.piece_to_id(token)

    def encode(self, text: str) -> list[int]:
        ids = [self.sp.bos_id()]
        for piece in self.split.split(text):
            if piece in self.added:
                ids.append(self.added[piece])
            elif piece:
                ids += self.sp.encode(piece)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = set(self.added.values()) | {self.sp.bos_id(), self.sp.eos_id()}
        return self.sp.decode([i for i in ids if i not in special and i < self.sp.get_piece_size()])


def reference_tokenizer(model_dir: Path):
    """transformers' own tokenizer class where one exists offline, else the sentencepiece reference."""
    from transformers import LlamaTokenizer, Qwen2Tokenizer

    cls = json.loads((model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class", "")
    if cls.startswith("Qwen2Tokenizer"):
        return Qwen2Tokenizer.from_pretrained(model_dir)
    if cls.startswith("LlamaTokenizer"):
        return LlamaTokenizer.from_pretrained(model_dir)
    return SentencePieceReference(model_dir)
