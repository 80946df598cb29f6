"""Sampler time per decode step (warm), as a markdown table: issue #10's modes, each alone and with
`logprobs=5`, at several batch sizes. On CUDA timed with CUDA events, elsewhere with the wall clock.

    python scripts/bench_sampler.py [--vocab 151936] [--batches 1 64 256] [--device cuda]
    python scripts/bench_sampler.py --profile "top-k 50" --batches 256   # where one mode's time goes
    python scripts/bench_sampler.py --profile "top-k 50 +lp5"           # ... with 5 top logprobs

Logits are float32, as the LM head returns them, and LLM-like: a few strong candidates over a noisy
floor, so the top-p nucleus is small; the `top-p flat` column uses plain Gaussian logits, whose
nucleus spans most of the vocabulary.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler, SamplingTensors
from nanovllm.sampling_params import SamplingParams

MODES = {
    "temperature": dict(temperature=0.8),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "min-p 0.05": dict(temperature=0.8, min_p=0.05),
}


def llm_like_logits(batch: int, vocab: int, flat: bool, device: str) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(0)
    logits = torch.randn(batch, vocab, device=device, generator=gen) * 1.5
    if not flat:
        top = torch.randint(0, vocab, (batch, 20), device=device, generator=gen)
        logits.scatter_(1, top, 8 + 6 * torch.rand(batch, 20, device=device, generator=gen))
    return logits


def warm_sampler(logits: torch.Tensor, params: dict) -> Callable[[], object]:
    """One sampler call over `logits` (one row per sequence with `params`), already run a few times."""
    device = logits.device
    rows = [Sequence(i, list(range(1, 50)), SamplingParams(**params)) for i in range(logits.shape[0])]
    tensors = SamplingTensors.from_rows(rows, logits.shape[1], [0], device)
    sampler = Sampler(torch.Generator(device).manual_seed(0))
    for _ in range(3):
        sampler(logits, tensors)
    return lambda: sampler(logits, tensors)


def time_step(logits: torch.Tensor, params: dict, iters: int) -> float:
    """Milliseconds per call of the sampler over `logits`, one row per sequence with `params`."""
    device = logits.device
    call = warm_sampler(logits, params)
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - start) * 1000 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def table(vocab: int, batches: list[int], iters: int, device: str) -> list[str]:
    columns = [(name, params, False) for name, params in MODES.items()]
    columns += [(f"{name} +lp5", {**params, "logprobs": 5}, False) for name, params in MODES.items()]
    columns.append(("top-p flat", MODES["top-p 0.9"], True))
    lines = [f"sampler ms per step, vocab {vocab}, {device}",
             "| batch | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for batch in batches:
        cells = [f"{time_step(llm_like_logits(batch, vocab, flat, device), params, iters):.3f}"
                 for _, params, flat in columns]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return lines


def profile_mode(mode: str, vocab: int, batch: int, iters: int, device: str) -> list[str]:
    """One mode's calls under torch.profiler: the ops and kernels with the most self time (device time
    on CUDA), then the wall time per call beside the kernels' sum, whose difference is the host's work
    and its waits for the device."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    name, _, logprobs = mode.partition(" +lp")
    if name not in MODES or (logprobs and not logprobs.isdigit()):
        raise SystemExit(f"--profile takes one of {list(MODES)}, optionally with ' +lpN', got {mode!r}")
    params = {**MODES[name], **({"logprobs": int(logprobs)} if logprobs else {})}
    call = warm_sampler(llm_like_logits(batch, vocab, False, device), params)
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            call()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000 / iters
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1000 / iters
    table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15)
    return [f"sampler {mode}, batch {batch}, vocab {vocab}, {device}", table,
            f"per call: {wall:.3f} ms wall (under the profiler), {kernels:.3f} ms of device kernels"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", metavar="MODE", default=None,
                   help=f"profile one mode instead: {list(MODES)}, optionally with ' +lpN'")
    args = p.parse_args()
    if args.profile is None:
        print("\n".join(table(args.vocab, args.batches, args.iters, args.device)))
        return
    for batch in args.batches:
        print("\n".join(profile_mode(args.profile, args.vocab, batch, args.iters, args.device)))


if __name__ == "__main__":
    main()
