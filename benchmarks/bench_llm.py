"""LLM backend benchmark: vlmbuild's torch backend (running the converted TensorRT-LLM checkpoint)
against transformers' own `generate` on the same random weights, dtype and device, in one run.

Real layer shapes (random weights) of the InternVL2 LLMs; a prompt as long as one 13-tile image
(~3.4k tokens). Reports prefill seconds, decode tokens/s and the ratios vlmbuild / transformers.

    python benchmarks/bench_llm.py --model qwen2-0.5b --device cuda --dtype bfloat16 --out result.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from vlmbuild.llm.convert import convert_checkpoint
from vlmbuild.llm.torch_runtime import TorchLLM

# Real shapes: InternVL2-1B's Qwen2-0.5B-Instruct and InternVL2-4B's Phi-3-mini (4k rope for the benchmark).
MODELS = {
    "qwen2-0.5b": (Qwen2ForCausalLM, Qwen2Config(vocab_size=151655, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False)),
    "phi3-3.8b": (Phi3ForCausalLM, Phi3Config(vocab_size=32020, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                              pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def run(model: str, device: str, dtype: str, prompt_len: int, new_tokens: int, repeat: int) -> dict:
    cls, cfg = MODELS[model]
    torch.manual_seed(0)
    hf = cls(cfg).to(dtype=getattr(torch, dtype)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        convert_checkpoint(Path(tmp) / "hf", Path(tmp) / "trt", dtype=dtype)
        ours = TorchLLM.load(Path(tmp) / "trt", device=device)  # CUDA-graph decode on a GPU
        eager = TorchLLM.load(Path(tmp) / "trt", device=device, cuda_graphs=False)
    hf = hf.to(device)
    ids = torch.randint(0, cfg.vocab_size, (prompt_len,)).tolist()
    x = torch.tensor([ids], device=device)

    def hf_gen(n):
        with torch.inference_mode():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def run_ours(llm, n):
        for _ in llm.generate(ids, max_new_tokens=n):
            pass

    def tps(prefill: float, total: float) -> float:
        return (new_tokens - 1) / (total - prefill)

    hf_prefill, our_prefill = _time(lambda: hf_gen(1), device, repeat), _time(lambda: run_ours(ours, 1), device, repeat)
    eager_prefill = _time(lambda: run_ours(eager, 1), device, repeat)
    hf_tps = tps(hf_prefill, _time(lambda: hf_gen(new_tokens), device, repeat))
    our_tps = tps(our_prefill, _time(lambda: run_ours(ours, new_tokens), device, repeat))
    eager_tps = tps(eager_prefill, _time(lambda: run_ours(eager, new_tokens), device, repeat))
    return {
        "model": model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
        "prompt_tokens": prompt_len, "new_tokens": new_tokens, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "prefill_s": {"vlmbuild": our_prefill, "transformers": hf_prefill, "speedup": hf_prefill / our_prefill},
        "decode_tok_s": {"vlmbuild": our_tps, "vlmbuild_eager": eager_tps, "transformers": hf_tps,
                         "speedup": our_tps / hf_tps, "eager_speedup": eager_tps / hf_tps},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), nargs="+", default=sorted(MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--prompt-len", type=int, default=3400)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    results = [run(m, a.device, a.dtype, a.prompt_len, a.new_tokens, a.repeat) for m in a.model]
    for r in results:
        print(f"{r['model']:<11} {r['device']} {r['dtype']}: prefill {r['prefill_s']['vlmbuild']:.3f}s vs "
              f"{r['prefill_s']['transformers']:.3f}s (x{r['prefill_s']['speedup']:.2f}); decode "
              f"{r['decode_tok_s']['vlmbuild']:.1f} (eager {r['decode_tok_s']['vlmbuild_eager']:.1f}) vs "
              f"{r['decode_tok_s']['transformers']:.1f} tok/s (x{r['decode_tok_s']['speedup']:.2f}, eager x{r['decode_tok_s']['eager_speedup']:.2f})")
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
