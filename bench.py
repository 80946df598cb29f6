"""Throughput benchmark: nano-vllm's workload on the Qwen3-0.6B architecture with dummy weights.

    python bench.py                      # 256 sequences, prompts and outputs of 100..1024 tokens
    python bench.py --model PATH --num-seqs 64 --enforce-eager
"""
from __future__ import annotations

import argparse
import json
import random
import time

from nanovllm import LLM, SamplingParams
from nanovllm.attention.kv_cache import KV_CACHE_DTYPES
from nanovllm.attention.selector import BACKENDS
from nanovllm.config import PRESET_PREFIX


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preset:qwen3-0.6b", help="a model directory or preset:NAME (dummy weights)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-input-len", type=int, default=100)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--min-output-len", type=int, default=100)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--repeat", type=int, default=1, help="timed runs, each with fresh prompts")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def workload(args: argparse.Namespace, run: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """nano-vllm's bench workload; run 0 is exactly its prompts (seed 0), later runs are fresh."""
    rng = random.Random(args.seed + run)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(args.min_input_len, args.max_input_len))]
               for _ in range(args.num_seqs)]
    params = [SamplingParams(temperature=args.temperature, ignore_eos=True,
                             max_tokens=rng.randint(args.min_output_len, args.max_output_len))
              for _ in range(args.num_seqs)]
    return prompts, params


def timed_run(llm: LLM, args: argparse.Namespace, run: int) -> dict[str, float]:
    prompts, params = workload(args, run)
    before = llm.stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = llm.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    delta = {k: after[k] - before[k] for k in ("prefill_tokens", "decode_tokens", "prefill_time", "decode_time")}
    return {
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "throughput_tok_s": round(tokens / seconds, 1),
        "prefill_tok_s": round(delta["prefill_tokens"] / max(delta["prefill_time"], 1e-9), 1),
        "decode_tok_s": round(delta["decode_tokens"] / max(delta["decode_time"], 1e-9), 1),
        "prefill_seconds": round(delta["prefill_time"], 3),
        "decode_seconds": round(delta["decode_time"], 3),
    }


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    llm = LLM(args.model, load_format="dummy" if args.model.startswith(PRESET_PREFIX) else "auto",
              max_model_len=args.max_model_len, kvcache_block_size=args.block_size,
              attention_backend=args.attention_backend, kv_cache_dtype=args.kv_cache_dtype,
              enforce_eager=args.enforce_eager,
              device=args.device, skip_tokenizer_init=True, seed=args.seed)
    startup = time.perf_counter() - start
    print(f"startup: {startup:.1f} s")
    for i in range(args.warmup):
        llm.generate(*workload(args, 1000 + i), use_tqdm=False)
    runs = [timed_run(llm, args, run) for run in range(args.repeat)]
    best = max(runs, key=lambda r: r["throughput_tok_s"])
    stats = llm.stats()
    result = {**best, "startup_seconds": round(startup, 1), "runs": len(runs),
              "kv_blocks_total": stats["kv_blocks_total"], "kv_blocks_peak_used": stats["kv_blocks_peak_used"],
              "kv_blocks_used": stats["kv_blocks_used"], "kv_waste_fraction": round(stats["kv_waste_fraction"], 4)}
    print(f"output tokens: {best['output_tokens']}, time: {best['seconds']:.2f} s, "
          f"throughput: {best['throughput_tok_s']:.0f} tok/s")
    print(f"prefill: {best['prefill_tok_s']:.0f} tok/s in {best['prefill_seconds']:.2f} s, "
          f"decode: {best['decode_tok_s']:.0f} tok/s in {best['decode_seconds']:.2f} s")
    print(f"KV blocks: {stats['kv_blocks_total']} total, {stats['kv_blocks_peak_used']} peak used, "
          f"{stats['kv_blocks_used']} used now; KV waste (time-averaged empty share of allocated slots): "
          f"{stats['kv_waste_fraction']:.2%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
