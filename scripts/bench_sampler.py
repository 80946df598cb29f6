"""Sampler time per decode step on the GPU (CUDA events, warm), as a markdown table.

    python scripts/bench_sampler.py [--vocab 151936] [--sampler path/to/other_sampler.py]

Logits are bf16 and LLM-like: a few strong candidates over a noisy floor, so the top-p
nucleus is small; the `top-p flat` column uses plain Gaussian logits, whose nucleus spans
most of the vocabulary. `--sampler` times another sampler module with the older
`from_sequences` API (for before/after tables).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

MODES = {
    "temperature": dict(temperature=0.8),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "min-p 0.05": dict(temperature=0.8, min_p=0.05),
}


def load_sampler(path: str | None):
    if path is None:
        from nanovllm.layers import sampler
        return sampler
    spec = importlib.util.spec_from_file_location("other_sampler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def llm_like_logits(batch: int, vocab: int, flat: bool) -> torch.Tensor:
    gen = torch.Generator("cuda").manual_seed(0)
    logits = torch.randn(batch, vocab, device="cuda", generator=gen) * 1.5
    if not flat:
        top = torch.randint(0, vocab, (batch, 20), device="cuda", generator=gen)
        logits.scatter_(1, top, 8 + 6 * torch.rand(batch, 20, device="cuda", generator=gen))
    return logits.to(torch.bfloat16)


def time_step(module, logits: torch.Tensor, params: dict, iters: int) -> float:
    seqs = [Sequence(list(range(1, 50)), SamplingParams(**params)) for _ in range(logits.shape[0])]
    vocab = logits.shape[1]
    if hasattr(module.SamplingTensors, "from_rows"):
        tensors = module.SamplingTensors.from_rows(seqs, vocab, [0], "cuda")
    else:
        tensors = module.SamplingTensors.from_sequences(seqs, vocab, [0], "cuda")
    sampler = module.Sampler()
    for _ in range(3):
        sampler(logits, tensors)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        sampler(logits, tensors)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--sampler", default=None)
    args = p.parse_args()
    module = load_sampler(args.sampler)
    columns = [(name, params, False) for name, params in MODES.items()]
    columns += [(f"{name} +lp5", {**params, "logprobs": 5}, False) for name, params in MODES.items()]
    columns.append(("top-p flat", MODES["top-p 0.9"], True))
    print(f"sampler: {args.sampler or 'nanovllm.layers.sampler'}, vocab {args.vocab}, ms per step")
    print("| batch | " + " | ".join(c[0] for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for batch in args.batches:
        cells = []
        for _, params, flat in columns:
            logits = llm_like_logits(batch, args.vocab, flat)
            cells.append(f"{time_step(module, logits, params, args.iters):.3f}")
        print(f"| {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
