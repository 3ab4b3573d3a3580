"""The InternVL2 checkpoint layout: `InternVLChatModel` = vision_model + mlp1 + language_model (model-facts §1)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmbuild.fsutil import write_json
from vlmbuild.recipe import Recipe
from vlmbuild.synth.intern_vit import IMAGE_SIZE, mlp1_tensors, vision_config, vision_tensors, vit_shape
from vlmbuild.synth.llm import TINY, get_llm
from vlmbuild.synth.weights import Noise, finish, split_point, write_safetensors_shards

_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}


def write_internvl(recipe: Recipe, out: Path, seed: int) -> None:
    llm = get_llm(recipe.family)
    vit = vit_shape(recipe.layout_repo)
    vocab = llm.write_tokenizer(out)
    llm_config = llm.config(TINY, vocab, recipe.layout_repo)
    write_json(out / "config.json", _top_config(recipe, llm_config, vision_config(vit)))
    write_json(out / "generation_config.json", llm.generation_config(vocab))

    noise = Noise(seed)
    tensors = {**vision_tensors(vit, noise), **mlp1_tensors(vit, TINY.hidden, noise)}
    tensors.update({f"language_model.{k}": v for k, v in llm.tensors(TINY, vocab.size, noise).items()})
    tensors = finish(tensors, torch.bfloat16)
    write_safetensors_shards(out, tensors, split_point(list(tensors), "language_model." + llm.first_layer))


def _top_config(recipe: Recipe, llm_config: dict, vit_config: dict) -> dict:
    return {
        "_commit_hash": None,
        "architectures": ["InternVLChatModel"],
        "auto_map": _AUTO_MAP,
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": IMAGE_SIZE,
        "llm_config": llm_config,
        "max_dynamic_patch": recipe.max_dynamic_patch,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": recipe.template,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": vit_config,
    }
