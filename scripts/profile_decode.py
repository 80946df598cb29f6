"""Where a decode step's time goes on the GPU: host time per phase, device time, and a kernel table.

    python scripts/profile_decode.py [--num-seqs 256] [--steps 40]
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.attention.metadata import build_layout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    llm = LLM("preset:qwen3-0.6b", load_format="dummy", max_model_len=4096, enforce_eager=args.enforce_eager)
    rng = random.Random(0)
    for i in range(args.num_seqs):
        prompt = [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
        llm.add_request(str(i), prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1000))
    while llm.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in llm.scheduler.running):
        llm.step()
    for _ in range(10):
        llm.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    torch.cuda.synchronize()
    print(f"decode step wall: {(time.perf_counter() - start) / args.steps * 1e3:.2f} ms "
          f"({args.num_seqs} seqs)")
    # host-only cost of one step's input arrays, without the device
    runner, seqs = llm.model_runner, list(llm.scheduler.running)
    t0 = time.perf_counter()
    build_layout([1] * len(seqs), [s.num_tokens for s in seqs], [s.block_table for s in seqs], runner.block_size,
                 num_rows=runner.graphs.bucket(len(seqs)) if runner.graphs else None)
    t1 = time.perf_counter()
    print(f"host input arrays: {(t1 - t0) * 1e3:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            llm.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
