"""A work directory loaded for serving: tokenizer, template, preprocessing, vision and LLM backends.

`build_request` is the pure-CPU half of a request (media → tiles → prompt → ids with fake image
ids); `encode_images` + `llm.generate` are the accelerator half, run by the engine's worker."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import RequestError, ToolMissingError
from vlmbuild.llm.family import get_family
from vlmbuild.llm.sampling import SamplingParams
from vlmbuild.llm.trtllm_config import TrtLlmConfig
from vlmbuild.pipeline import GUIDE_MODEL_NAMES, read_workdir
from vlmbuild.recipe import Recipe
from vlmbuild.serve.media import MediaPolicy, load_image
from vlmbuild.serve.preprocess import FRAME_MAX_TILES, preprocessor_for
from vlmbuild.serve.prompt import build_prompt, get_image_style, image_refs
from vlmbuild.serve.protocol import ChatCompletionRequest
from vlmbuild.serve.templates import get_template
from vlmbuild.tokenizer import load_tokenizer

log = logging.getLogger("vlmbuild.serve")
LLM_BACKENDS = ("auto", "trtllm", "torch")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ServeOptions:
    llm_backend: str = "auto"
    vision_backend: str = "auto"
    device: str = "auto"
    allowed_local_media_path: Path | None = None
    served_model_name: str | None = None


@dataclass
class BuiltRequest:
    input_ids: list[int]  # image positions hold fake ids vocab_size + k
    pixel_values: torch.Tensor | None  # [tiles, 3, 448, 448]
    image_keys: list[bytes]  # one digest per image for TRT-LLM KV-cache reuse (empty for torch)
    rows_per_image: list[int]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ToolMissingError("--device cuda was asked for but torch sees no CUDA device", hint="use --device cpu")
    return device


class ServingModel:
    def __init__(self, workdir: str | Path, options: ServeOptions = ServeOptions()):
        workdir = Path(workdir)
        data = read_workdir(workdir)
        self.recipe = Recipe.model_validate({k: v for k, v in data["recipe"].items() if k != "derived"})
        self.model_dir = Path(data["model_dir"])
        self.name = options.served_model_name or self.recipe.name
        self.tokenizer = load_tokenizer(self.model_dir)
        hf = HfCheckpoint(self.model_dir).config
        self.aliases = _aliases(self.name, self.recipe, hf.architectures)
        self.template = get_template(self.recipe.template or hf.template or "")
        self.style = get_image_style(self.template.image_style)
        self.preprocess = preprocessor_for(self.recipe.vision, self.recipe.max_dynamic_patch)
        self.policy = MediaPolicy(allowed_local_media_path=options.allowed_local_media_path)
        self.device = resolve_device(options.device)
        ckpt_dir = workdir / data["llm_checkpoint"]
        self.llm_cfg = TrtLlmConfig.read(ckpt_dir)
        self.llm, self.llm_backend = self._load_llm(workdir, data, ckpt_dir, options.llm_backend)
        from vlmbuild.vision.runtime import load_vision_runtime  # onnxruntime is only needed here

        self.vision = load_vision_runtime(workdir / data["vision"], options.vision_backend, self.device, self.model_dir)
        self.context_id = self.tokenizer.token_to_id(self.style.context_token)
        stops = {*self.template.stop, *get_family(self.recipe.family).stop_tokens}
        self.stop_token_ids = frozenset({self._maybe_id(s) for s in stops} - {None} | {self.tokenizer.eos_token_id})
        self.max_seq_len = self.recipe.llm.max_seq_len
        self.defaults = _generation_defaults(self.model_dir)

    def _maybe_id(self, token: str) -> int | None:
        try:
            return self.tokenizer.token_to_id(token)
        except Exception:  # a family stop token this tokenizer lacks (e.g. </s> in Qwen2)
            return None

    def _load_llm(self, workdir: Path, data: dict, ckpt_dir: Path, backend: str):
        engine = workdir / data["llm_engine"] if data.get("llm_engine") else None
        usable = engine is not None and importlib.util.find_spec("tensorrt_llm") is not None and self.device == "cuda"
        if backend == "trtllm" or (backend == "auto" and usable):
            if not usable:
                raise ToolMissingError("the trtllm backend needs an LLM engine, tensorrt_llm and a CUDA device",
                                       hint="build one with `vlmbuild build` on a GPU machine, or use --llm-backend torch")
            from vlmbuild.llm.trtllm_runtime import TrtllmLLM

            log.info("LLM backend: trtllm (engine %s)", engine)
            return TrtllmLLM(engine, self.llm_cfg), "trtllm"
        from vlmbuild.llm.torch_runtime import TorchLLM

        # CPU kernels for bf16/fp16 are slow and partial: compute in float32 there.
        dtype = "float32" if self.device == "cpu" else None
        why = "requested" if backend == "torch" else "no TRT-LLM engine/runtime/GPU"
        log.info("LLM backend: torch on %s (%s)", self.device, why)
        return TorchLLM.load(ckpt_dir, device=self.device, dtype=dtype), "torch"

    # ---- request half that runs on the media threads -------------------------------------------

    def build_request(self, req: ChatCompletionRequest) -> BuiltRequest:
        refs = image_refs(req.messages, self.style, req.images or ())
        pixels, tiles, keys = [], [], []
        for k, ref in enumerate(refs):
            image = load_image(ref.url, self.policy, index=k)
            t = self.preprocess(image, max_num=FRAME_MAX_TILES if ref.video_frame else None)
            pixels.append(t)
            tiles.append(t.shape[0])
            if self.llm_backend == "trtllm":  # KV-reuse keys; the torch backend reuses nothing
                keys.append(hashlib.sha256(t.numpy().tobytes()).digest())
        limit = self.recipe.llm.max_patches_per_request
        if sum(tiles) > limit:
            raise RequestError(f"the request's {len(refs)} image(s) make {sum(tiles)} tiles; this model accepts {limit} per request",
                               param="messages", code="too_many_images")
        prompt = build_prompt(req.messages, self.template, None, tiles, self.recipe.tokens_per_patch, images=req.images or ())
        ids = self._ids(prompt.text(), prompt.image_tokens)
        rows = [n * self.recipe.tokens_per_patch for n in tiles]
        return BuiltRequest(ids, torch.cat(pixels) if pixels else None, keys, rows)

    def _ids(self, text: str, image_tokens: int) -> list[int]:
        ids = self.tokenizer.encode(text)
        at = [i for i, t in enumerate(ids) if t == self.context_id]
        if len(at) != image_tokens:
            raise RequestError(f"the text itself contains {len(at) - image_tokens} '{self.style.context_token}' tokens",
                               param="messages")
        vocab = self.llm_cfg.vocab_size
        for k, i in enumerate(at):  # k-th image position reads row k of the prompt table
            ids[i] = vocab + k
        if len(ids) > self.recipe.llm.max_input_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model accepts {self.recipe.llm.max_input_len}",
                               param="messages", code="context_length_exceeded")
        return ids

    def sampling(self, req: ChatCompletionRequest) -> SamplingParams:
        d = self.defaults
        top_k = req.top_k if req.top_k is not None else d.get("top_k", 0)
        return SamplingParams(
            temperature=req.temperature if req.temperature is not None else d.get("temperature", 1.0),
            top_p=req.top_p if req.top_p is not None else d.get("top_p", 1.0),
            top_k=max(top_k, 0),
            repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else d.get("repetition_penalty", 1.0),
            seed=req.seed,
        )

    def max_new_tokens(self, req: ChatCompletionRequest, prompt_len: int) -> int:
        room = self.max_seq_len - prompt_len
        if room < 1:
            raise RequestError(f"the prompt has {prompt_len} tokens and leaves no room to generate (max {self.max_seq_len})",
                               param="messages", code="context_length_exceeded")
        asked = req.max_new_tokens
        if asked is not None and asked > room:
            raise RequestError(f"max_tokens={asked} exceeds the {room} tokens left after a {prompt_len}-token prompt",
                               param="max_tokens")
        return asked or room

    # ---- request half that runs on the generation worker ----------------------------------------

    def encode_images(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """[tiles, 3, 448, 448] → prompt table [tiles·256, hidden] (the vision runtime batches)."""
        if pixel_values is None:
            return None
        features = self.vision(pixel_values)
        return features.reshape(-1, features.shape[-1])

    def backend_extras(self, image_keys: list[bytes], rows_per_image: list[int]) -> dict:
        if self.llm_backend == "trtllm":
            return {"image_keys": image_keys, "rows_per_image": rows_per_image}
        return {}


def _aliases(name: str, recipe: Recipe, architectures: list[str]) -> frozenset[str]:
    """Names a request's `model` may use: the served name, the recipe and its hub repo, and the name
    the reference guide's requests send ("InternVL2"), so clients written for it work unchanged."""
    names = {name, recipe.name}
    if recipe.hf_repo:
        names |= {recipe.hf_repo, recipe.hf_repo.rsplit("/", 1)[-1]}
    names |= {GUIDE_MODEL_NAMES[a] for a in architectures[:1] if a in GUIDE_MODEL_NAMES}
    return frozenset(names)


def _generation_defaults(model_dir: Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (e.g. Qwen-VL-Chat top_p 0.3)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    out = {k: raw[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if raw.get(k) is not None}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
