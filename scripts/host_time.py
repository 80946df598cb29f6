"""Host time of a decode step: the engine's Python per step, with the model and sampler stubbed.

    python scripts/host_time.py [--num-seqs 256] [--stream] [--ngram K]

A tiny random model and word-level tokenizer on CPU (the test suite's builders, in a temporary
directory); the forward and the sampler are replaced by constant outputs, so what is timed is
scheduling, input preparation, read-back, stop checks, detokenization and (with --stream) the
per-request deltas. Best of 5 x 50 steps. On a GPU this work overlaps the device's step and
sets the pace whenever it is the longer of the two. With --ngram K the steps speculate (prompt
lookup, K tokens): the stub's constant token makes every proposal accepted, and a speculative
step's host work does not overlap the device's, so it adds to every step.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import TINY, build_tiny_model, build_tiny_tokenizer  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.layers import sampler  # noqa: E402


def stub_device_work(llm: LLM) -> None:
    """Logits of the right shape and a constant token for every row, without running anything."""
    llm.model_runner.execute = lambda step, extra: (torch.zeros(len(step.logit_rows), TINY["vocab_size"]),
                                                    [torch.from_numpy(a) for a in extra])
    sampler.Sampler.forward = lambda self, logits, t: sampler.SamplerOutput(
        torch.full((logits.shape[0],), 7), None, None, None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--stream", action="store_true", help="deltas every step, as a server asks")
    p.add_argument("--ngram", type=int, default=0, metavar="K", help="speculate K tokens by prompt lookup")
    p.add_argument("--profile", action="store_true", help="cProfile the timed steps: the top functions")
    p.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"], help="the profile's order")
    args = p.parse_args()
    torch.set_num_threads(1)
    path = tempfile.mkdtemp()
    build_tiny_model("qwen3", path)
    build_tiny_tokenizer(path)
    spec = {"method": "ngram", "num_speculative_tokens": args.ngram,
            "disable_by_batch_size": args.num_seqs} if args.ngram else None
    llm = LLM(path, device="cpu", max_num_seqs=256, max_model_len=1024, max_num_batched_tokens=8192,
              speculative_config=spec)
    rng = random.Random(0)
    for i in range(args.num_seqs):
        prompt = [rng.randint(0, TINY["vocab_size"] - 1) for _ in range(rng.randint(20, 200))]
        llm.add_request(str(i), prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=800),
                        stream=args.stream)
    while llm.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in llm.scheduler.running):
        llm.step()
    stub_device_work(llm)
    llm.overlap_steps = True  # as on a GPU: a step launches before the last one is read back
    for _ in range(20):
        llm.step()
    best = float("inf")
    profiler = cProfile.Profile() if args.profile else None
    for _ in range(5):
        start = time.perf_counter()
        with profiler or contextlib.nullcontext():
            for _ in range(50):
                llm.step()
        best = min(best, (time.perf_counter() - start) / 50)
    mode = (", streamed" if args.stream else "") + (f", speculating {args.ngram}" if args.ngram else "")
    print(f"{args.num_seqs} sequences{mode}: {best * 1e3:.3f} ms of host time per step")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(25)


if __name__ == "__main__":
    main()
