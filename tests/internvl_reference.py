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
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

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


def _text_config(llm: dict):
    if llm["architectures"][0] != "Qwen2ForCausalLM":
        raise NotImplementedError(llm["architectures"][0])
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act")
    return Qwen2Config(**{k: llm[k] for k in keys if k in llm}, rope_theta=llm.get("rope_theta", 1000000.0),
                       tie_word_embeddings=False)


def _rename_llm(name: str) -> str:
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    return name.replace("language_model.lm_head.", "lm_head.")


def load_reference(model_dir: Path, image_token: str = "<IMG_CONTEXT>", tokenizer=None) -> InternVLForConditionalGeneration:
    raw = json.loads((model_dir / "config.json").read_text())
    vc = raw["vision_config"]
    vision = InternVLVisionConfig(
        hidden_size=vc["hidden_size"], num_hidden_layers=vc["num_hidden_layers"], num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"], attention_bias=vc["qkv_bias"], use_qk_norm=vc["qk_normalization"],
        norm_type=vc["norm_type"], layer_norm_eps=vc["layer_norm_eps"], image_size=vc["image_size"], patch_size=vc["patch_size"],
        hidden_act=vc["hidden_act"], use_absolute_position_embeddings=True, use_mean_pooling=True)
    cfg = InternVLConfig(vision_config=vision.to_dict(), text_config=_text_config(raw["llm_config"]).to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids(image_token), downsample_ratio=raw["downsample_ratio"],
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
                state[_rename_llm(name)] = t
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


def hermes2_prompt(turns: list[tuple[str, str | None]], system: str = SYSTEM) -> str:
    """InternVL conversation.py `Hermes-2`/`internlm2-chat` (MPT style, no newline after <|im_end|>)."""
    out = f"<|im_start|>system\n{system}<|im_end|>"
    for user, assistant in turns:
        out += f"<|im_start|>user\n{user}<|im_end|><|im_start|>assistant\n"
        if assistant is not None:
            out += f"{assistant}<|im_end|>"
    return out
