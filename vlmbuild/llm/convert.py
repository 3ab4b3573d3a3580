"""HF checkpoint → TensorRT-LLM checkpoint (config.json + rank{r}.safetensors), layer by layer.

Facts: trtllm-facts §1 (config), §2 (names, shapes, TP/PP split), §3 (weight-only: we write float
weights with `quant_algo` set, and trtllm-build quantizes them for the GPU it runs on).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from vlmbuild.checkpoint import HfCheckpoint
from vlmbuild.errors import CheckpointError, ConfigError
from vlmbuild.fsutil import atomic_dir, write_json
from vlmbuild.llm.family import Family, Transform, family_for_architecture
from vlmbuild.llm.trtllm_config import DTYPES, QUANT_ALGOS, TrtLlmConfig, TrtMapping, TrtQuantization
from vlmbuild.llm.writer import StreamingSafetensorsWriter
from vlmbuild.manifest import write_manifest



@dataclass(frozen=True)
class Wrapper:
    """How a multimodal checkpoint nests its LLM: prefix to strip, other models' prefixes to skip."""

    strip: str = ""
    skip: tuple[str, ...] = ()


# Keyed by the top-level config `model_type`; anything else is read as a plain causal LM.
WRAPPERS = {"internvl_chat": Wrapper(strip="language_model.", skip=("vision_model.", "mlp1."))}

# Parts split across TP ranks and on which dim (column-parallel 0, row-parallel 1); others replicate.
SPLIT_DIM = {
    "attention.dense.weight": 1,
    "mlp.proj.weight": 1,
    "mlp.fc.weight": 0,
    "mlp.fc.bias": 0,
    "mlp.gate.weight": 0,
    "mlp.gate.bias": 0,
}
LAYER_PARTS = ("input_layernorm.weight", "attention.q.weight", "attention.k.weight", "attention.v.weight",
               "attention.dense.weight", "post_layernorm.weight", "mlp.fc.weight", "mlp.gate.weight", "mlp.proj.weight")
BIAS_PARTS = ("attention.q.bias", "attention.k.bias", "attention.v.bias")


@dataclass
class ConvertResult:
    output_dir: Path
    family: str
    config: TrtLlmConfig
    tensors_read: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Entry:
    source: str  # full HF name
    target: str  # part template, or HF template for a transform
    transform: Transform | None


def convert_checkpoint(
    model_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "bfloat16",
    tp_size: int = 1,
    pp_size: int = 1,
    weight_only: str | None = None,
    expect_family: str | None = None,
    show_progress: bool = False,
) -> ConvertResult:
    start = time.time()
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if weight_only not in QUANT_ALGOS:
        raise ConfigError(f"weight-only '{weight_only}' is not int8 or int4")
    ckpt = HfCheckpoint(model_dir)
    family = family_for_architecture(ckpt.config.llm_architecture)
    if expect_family and family.name != expect_family:
        raise ConfigError(f"the recipe expects a {expect_family} LLM but {model_dir} holds {ckpt.config.llm_architecture}")
    common = {
        "dtype": dtype,
        "mapping": TrtMapping(world_size=tp_size * pp_size, tp_size=tp_size, pp_size=pp_size),
        "quantization": TrtQuantization(quant_algo=QUANT_ALGOS[weight_only]),
    }
    cfg = family.read_config(ckpt.config.llm, common)
    if family.max_pp_size and pp_size > family.max_pp_size:
        raise ConfigError(f"the {family.name} family supports pp_size up to {family.max_pp_size}, got {pp_size}")
    _check_parallel(cfg)
    wrapper = WRAPPERS.get(ckpt.config.model_type, Wrapper())
    plan, skipped = _plan(ckpt, family, wrapper)
    _check_layers(plan, cfg)
    with atomic_dir(output_dir) as tmp:
        writers = {r: StreamingSafetensorsWriter(tmp / f"rank{r}.safetensors") for r in range(cfg.world_size)}
        groups = [None, *range(cfg.num_hidden_layers)]
        with Progress(disable=not show_progress, transient=True) as progress:
            task = progress.add_task("converting layers", total=len(groups))
            for layer in groups:
                parts = _load_parts(ckpt, plan.get(layer, []), layer, cfg)
                _write_group(writers, parts, layer, cfg)
                progress.advance(task)
        for w in writers.values():
            w.close()
        write_json(tmp / "config.json", cfg.to_json_dict())
        write_manifest(tmp, "trtllm-checkpoint", family=family.name, source=str(Path(model_dir).resolve()),
                       llm_architecture=ckpt.config.llm_architecture, dtype=dtype, tp_size=tp_size,
                       pp_size=pp_size, weight_only=weight_only, skipped_prefixes=skipped)
    n = sum(len(v) for v in plan.values())
    return ConvertResult(Path(output_dir), family.name, cfg, n, skipped, time.time() - start)


def _check_parallel(cfg: TrtLlmConfig) -> None:
    tp, pp = cfg.mapping.tp_size, cfg.mapping.pp_size
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    problems = []
    if nh % tp:
        problems.append(f"{nh} attention heads")
    if nkv % tp and tp % nkv:
        problems.append(f"{nkv} kv heads")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    if pp > cfg.num_hidden_layers:
        problems.append(f"{cfg.num_hidden_layers} layers for pp {pp}")
    if problems:
        raise ConfigError(f"tp_size={tp}/pp_size={pp} does not divide {', '.join(problems)}")


def _plan(ckpt: HfCheckpoint, family: Family, wrapper: Wrapper) -> tuple[dict[int | None, list[_Entry]], dict[str, int]]:
    """Assign every source tensor to a layer group, or to an explicit skip prefix, or fail."""
    patterns = family.patterns()
    skips = (*wrapper.skip, *family.skip_prefixes)
    plan: dict[int | None, list[_Entry]] = {}
    skipped: dict[str, int] = {}
    leftovers = []
    for name in ckpt.names():
        prefix = next((p for p in skips if name.startswith(p)), None)
        if prefix is not None:
            skipped[prefix] = skipped.get(prefix, 0) + 1
            continue
        local = name[len(wrapper.strip):] if wrapper.strip and name.startswith(wrapper.strip) else name
        for regex, target, fn in patterns:
            m = regex.match(local)
            if m:
                layer = int(m.group("i")) if "i" in regex.groupindex else None
                plan.setdefault(layer, []).append(_Entry(name, target, fn))
                break
        else:
            leftovers.append(name)
    if leftovers:
        shown = ", ".join(leftovers[:12]) + (f" … (+{len(leftovers) - 12} more)" if len(leftovers) > 12 else "")
        raise CheckpointError(f"{len(leftovers)} tensors are neither converted nor skipped by the {family.name} family: {shown}")
    return plan, skipped


def _check_layers(plan: dict[int | None, list[_Entry]], cfg: TrtLlmConfig) -> None:
    found = sorted(k for k in plan if k is not None)
    if found != list(range(cfg.num_hidden_layers)):
        raise CheckpointError(f"config says {cfg.num_hidden_layers} layers but the weights hold layers {found[:3]}…{found[-3:]}")


def _load_parts(ckpt: HfCheckpoint, entries: list[_Entry], layer: int | None, cfg: TrtLlmConfig) -> dict[str, torch.Tensor]:
    """Read one group's source tensors and map them to TRT part names (layer index kept global)."""
    dtype = DTYPES[cfg.dtype]
    parts: dict[str, torch.Tensor] = {}
    for e in entries:
        t = ckpt.get(e.source)
        produced = e.transform(t, cfg) if e.transform else {e.target: t}
        for name, value in produced.items():
            parts[name.format(i=layer)] = value.to(dtype) if value.is_floating_point() else value
    if layer is None:
        _complete_globals(parts, cfg)
    else:
        _check_layer_parts(parts, layer, cfg)
    return parts


def _complete_globals(parts: dict[str, torch.Tensor], cfg: TrtLlmConfig) -> None:
    emb = parts.get("transformer.vocab_embedding.weight")
    if emb is None or "transformer.ln_f.weight" not in parts:
        raise CheckpointError("the checkpoint lacks the token embedding or the final norm")
    if "lm_head.weight" not in parts:
        if not cfg.tie_word_embeddings:
            raise CheckpointError("the checkpoint has no lm_head and tie_word_embeddings is false")
        parts["lm_head.weight"] = emb.clone()  # tied head: TRT-LLM wants its own (padded) copy
    if tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(f"embedding is {list(emb.shape)}, config says [{cfg.vocab_size}, {cfg.hidden_size}]")


def _check_layer_parts(parts: dict[str, torch.Tensor], layer: int, cfg: TrtLlmConfig) -> None:
    needed = LAYER_PARTS + (BIAS_PARTS if cfg.attn_bias else ())
    missing = [p for p in needed if f"transformer.layers.{layer}.{p}" not in parts]
    if missing:
        raise CheckpointError(f"layer {layer} lacks {', '.join(missing)} after mapping")
    q = parts[f"transformer.layers.{layer}.attention.q.weight"]
    if q.shape[0] != cfg.num_attention_heads * cfg.head_size:
        raise CheckpointError(f"layer {layer} q projection has {q.shape[0]} rows, expected heads×head_size = {cfg.num_attention_heads * cfg.head_size}")


def _write_group(writers: dict[int, StreamingSafetensorsWriter], parts: dict[str, torch.Tensor], layer: int | None, cfg: TrtLlmConfig) -> None:
    tp, pp = cfg.mapping.tp_size, cfg.mapping.pp_size
    stages = torch.tensor_split(torch.arange(cfg.num_hidden_layers), pp)
    for pp_rank, stage in enumerate(stages):
        if layer is not None and layer not in stage.tolist():
            continue
        for tp_rank in range(tp):
            shard = _shard(parts, cfg, tp_rank)
            w = writers[pp_rank * tp + tp_rank]
            for name, t in shard.items():
                if layer is None and not _global_on_stage(name, pp_rank, pp):
                    continue
                if layer is not None:  # PP renumbers layers locally
                    name = name.replace(f"layers.{layer}.", f"layers.{layer - int(stage[0])}.", 1)
                w.add(name, t)


def _global_on_stage(name: str, pp_rank: int, pp: int) -> bool:
    if name.startswith("transformer.vocab_embedding"):
        return pp_rank == 0
    return pp_rank == pp - 1  # ln_f and lm_head


def _shard(parts: dict[str, torch.Tensor], cfg: TrtLlmConfig, r: int) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's view of a group: fused qkv, split columns/rows, padded head."""
    tp = cfg.mapping.tp_size
    out: dict[str, torch.Tensor] = {}
    for name, t in parts.items():
        prefix, _, leaf = name.partition("attention.")
        if leaf[:2] in ("q.", "k.", "v."):
            continue  # fused below
        local = name.split(".", 3)[-1] if name.startswith("transformer.layers.") else name
        if name == "lm_head.weight":
            out[name] = _split(_pad_rows(t, math.ceil(cfg.vocab_size / tp) * tp), tp, 0, r)
        elif local in SPLIT_DIM:
            out[name] = _split(t, tp, SPLIT_DIM[local], r)
        else:
            out[name] = t
    for prefix in {n.rsplit("attention.", 1)[0] for n in parts if ".attention.q." in n}:
        for kind in ("weight", "bias"):
            q = parts.get(f"{prefix}attention.q.{kind}")
            if q is not None:
                k, v = parts[f"{prefix}attention.k.{kind}"], parts[f"{prefix}attention.v.{kind}"]
                out[f"{prefix}attention.qkv.{kind}"] = _fused_qkv(q, k, v, cfg, r)
    if not cfg.gated_mlp:
        _fuse_swiglu(out)
    return out


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: TrtLlmConfig, r: int) -> torch.Tensor:
    """[Q_r; K_r; V_r] for rank r. Q: [nh*hd, H]; K, V: [nkv*hd, H] (biases drop the H dim)."""
    tp, nkv, hd = cfg.mapping.tp_size, cfg.num_key_value_heads, cfg.head_size
    if nkv < tp:  # each rank needs one whole kv head: repeat each head tp/nkv times, in order
        rep = tp // nkv
        k = k.reshape(nkv, hd, *k.shape[1:]).repeat_interleave(rep, dim=0).reshape(nkv * rep * hd, *k.shape[1:])
        v = v.reshape(nkv, hd, *v.shape[1:]).repeat_interleave(rep, dim=0).reshape(nkv * rep * hd, *v.shape[1:])
    return torch.cat([_split(q, tp, 0, r), _split(k, tp, 0, r), _split(v, tp, 0, r)], dim=0)


def _fuse_swiglu(out: dict[str, torch.Tensor]) -> None:
    """swiglu families: TRT-LLM computes `x, g = chunk(fc(x), 2); silu(g) * x`, so each rank's fc is
    [linear_r; activated_r] — fused per rank, never split after fusing (trtllm-facts §2.3 pitfall)."""
    for name in [n for n in out if n.endswith("mlp.fc.weight")]:
        linear = out.pop(name.replace("mlp.fc.", "mlp.gate."))
        out[name] = torch.cat([linear, out[name]], dim=0)


def _split(t: torch.Tensor, tp: int, dim: int, r: int) -> torch.Tensor:
    if tp == 1:
        return t
    if t.ndim <= dim or t.shape[dim] % tp:
        raise CheckpointError(f"cannot split a tensor of shape {list(t.shape)} into {tp} parts on dim {dim}")
    return t.chunk(tp, dim=dim)[r].contiguous()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)
