"""`trtllm-build` from a recipe (1.x flag names, trtllm-facts §4). The engine build itself needs a GPU
and tensorrt_llm; everything up to the exact command line is pure and tested."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vlmbuild.errors import CheckpointError, ExportError, ToolMissingError
from vlmbuild.fsutil import atomic_dir
from vlmbuild.llm.trtllm_config import TrtLlmConfig
from vlmbuild.manifest import write_manifest
from vlmbuild.recipe import LlmBuild


@dataclass(frozen=True)
class LlmBuildResult:
    command: list[str]
    output_dir: Path | None
    built: bool
    seconds: float = 0.0


def trtllm_build_command(checkpoint_dir: Path, output_dir: Path, params: LlmBuild, max_multimodal_len: int, workers: int = 1) -> list[str]:
    """The exact `trtllm-build` argv; flag order follows the reference guide."""
    cmd = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir),
           "--gemm_plugin", params.gemm_plugin, "--max_batch_size", str(params.max_batch_size),
           "--kv_cache_type", params.kv_cache_type]
    if params.use_paged_context_fmha is not None:
        cmd += ["--use_paged_context_fmha", "enable" if params.use_paged_context_fmha else "disable"]
    cmd += ["--max_input_len", str(params.max_input_len), "--max_seq_len", str(params.max_seq_len),
            "--max_num_tokens", str(params.max_num_tokens), "--max_multimodal_len", str(max_multimodal_len)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    return cmd


def trtllm_available() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None and shutil.which("trtllm-build") is not None


def build_llm(checkpoint_dir: str | Path, output_dir: str | Path, params: LlmBuild, max_multimodal_len: int,
              dry_run: bool = False) -> LlmBuildResult:
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    cfg = TrtLlmConfig.read(checkpoint_dir)
    missing = [f"rank{r}.safetensors" for r in range(cfg.world_size) if not (checkpoint_dir / f"rank{r}.safetensors").is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint_dir} lacks {', '.join(missing)}", hint="re-run vlmbuild convert")
    cmd = trtllm_build_command(checkpoint_dir, output_dir, params, max_multimodal_len, workers=cfg.world_size)
    if dry_run:
        return LlmBuildResult(cmd, None, built=False)
    if not trtllm_available():
        raise ToolMissingError(
            f"tensorrt_llm is not installed, so no LLM engine was built; the TensorRT-LLM checkpoint in {checkpoint_dir} is ready",
            hint="serve it now with `vlmbuild serve --workdir W --llm-backend torch`, or install tensorrt_llm on a GPU machine and re-run",
        )
    start = time.time()
    with atomic_dir(output_dir) as tmp:
        argv = cmd.copy()
        argv[argv.index("--output_dir") + 1] = str(tmp)
        proc = subprocess.run(argv, check=False)
        if proc.returncode != 0:
            raise ExportError(f"trtllm-build exited with {proc.returncode}", hint=f"command: {shlex.join(argv)}")
        if not list(tmp.glob("rank*.engine")):
            raise ExportError(f"trtllm-build wrote no rank*.engine into {tmp}")
        write_manifest(tmp, "llm-engine", command=cmd, checkpoint=str(checkpoint_dir.resolve()),
                       max_batch_size=params.max_batch_size, max_input_len=params.max_input_len,
                       max_seq_len=params.max_seq_len, max_multimodal_len=max_multimodal_len)
    return LlmBuildResult(cmd, output_dir, built=True, seconds=time.time() - start)
