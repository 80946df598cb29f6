"""Whether a prefill chunk is bound by the host or the device: each chunk is launched with the device
idle (synchronized before), and the host's time to launch it is set against the time until the device
has finished it. A launch about as long as the whole means the device waits for the host.

    python scripts/prefill_time.py [--model PATH] [--num-seqs 256] [--max-num-batched-tokens N] [--cprofile 30]
    python scripts/prefill_time.py --model TINY_MODEL_DIR --max-model-len 1024 --num-seqs 3    # on CPU

bench.py's prompts (100-1,024 random tokens each), one output token, after one untimed run of other
prompts; weights are dummy for a preset. With --cprofile N, a second pass over fresh prompts under cProfile
(which slows the host ~2x) prints the N functions with the most host time inside the launches. H200,
8,192-token chunks: 19-21 ms to launch a chunk, done 0-2 ms later (call BP); 21-32 ms, done within 0.2 ms
(call BS).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import PRESET_PREFIX
from nanovllm.engine.scheduler import ScheduledBatch


def _sync(llm: LLM) -> None:
    if llm.model_runner.device.type == "cuda":
        torch.cuda.synchronize(llm.model_runner.device)


def measure(llm: LLM, prompts: list[list[int]], profiler: cProfile.Profile | None = None) -> list[dict]:
    """Generate one token for each prompt; per prefill chunk, its tokens, sequences and the ms to launch it
    and until it was done. The runner's `launch` is wrapped for the call and restored after it."""
    runner, chunks = llm.model_runner, []
    launch = runner.launch

    def timed_launch(batch: ScheduledBatch):
        if batch.is_decode:
            return launch(batch)
        _sync(llm)
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            pending = launch(batch)
        finally:
            if profiler is not None:
                profiler.disable()
        launched = time.perf_counter()
        _sync(llm)
        chunks.append({"tokens": sum(batch.num_new_tokens), "seqs": len(batch.seqs),
                       "launch_ms": 1e3 * (launched - start), "done_ms": 1e3 * (time.perf_counter() - start)})
        return pending

    runner.launch = timed_launch
    try:
        llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    finally:
        del runner.launch  # the instance attribute goes; the class's method shows again
    return chunks


def random_prompts(num_seqs: int, vocab_size: int, seed: int) -> list[list[int]]:
    """bench.py's prompt shapes: 100-1,024 random ids below 10,000 (or the vocabulary)."""
    rng, top = random.Random(seed), min(10000, vocab_size - 1)
    return [[rng.randint(0, top) for _ in range(rng.randint(100, 1024))] for _ in range(num_seqs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preset:qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the N costliest functions")
    args = p.parse_args()
    extra = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    llm = LLM(args.model, load_format="dummy" if args.model.startswith(PRESET_PREFIX) else "auto",
              max_model_len=args.max_model_len, skip_tokenizer_init=True, **extra)
    vocab = llm.config.hf_config.vocab_size
    measure(llm, random_prompts(args.num_seqs, vocab, 1000))  # warm-up
    chunks = measure(llm, random_prompts(args.num_seqs, vocab, 0))
    launch, done = sum(c["launch_ms"] for c in chunks), sum(c["done_ms"] for c in chunks)
    print(f"{len(chunks)} prefill chunks: {launch:.0f} ms launching, {done:.0f} ms until done "
          f"({done - launch:.0f} ms of device time after the launches)")
    for c in chunks:
        print(f"  {c['tokens']} tokens, {c['seqs']} sequences: launch {c['launch_ms']:.1f} ms, "
              f"done {c['done_ms']:.1f} ms")
    if args.cprofile:  # a pass of its own (fresh prompts): the profiler slows the host, not the device
        profiler = cProfile.Profile()
        measure(llm, random_prompts(args.num_seqs, vocab, 1), profiler)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.cprofile)
        print(text.getvalue())
    llm.shutdown()


if __name__ == "__main__":
    main()
