"""Where a small batch's engine step goes: wall time per step, the host's time waiting for the device (the
rest is host work: `launch`, of which the inputs' upload (`load`) and the graph replay call, and `complete`,
the read-back and bookkeeping), and on CUDA each graph's device time (events around its replays).

    python scripts/step_time.py [--model PATH] [--num-seqs 1] [--ngram K] [--tokens 400] [--prompt-len 1500]

Weights are dummy (step times do not depend on them) unless --real-weights. The prompts repeat a random
pattern, so with --ngram prompt lookup proposes; a dummy model rejects most proposals (--force-proposals
makes every step verify k of them, to time verify steps alone). Steps overlap as the engine runs them: when
the host waits little, the device sets the pace.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.cuda_graph import DecodeGraphs
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.model_runner import ModelRunner, PendingSample
from nanovllm.spec_decode.ngram_proposer import NgramIndex

TIMED = (("wait", PendingSample, "wait"), ("launch", ModelRunner, "launch"), ("load", DecodeGraphs, "load"),
         ("replay call", DecodeGraphs, "replay"), ("complete", LLMEngine, "_complete"))


@contextlib.contextmanager
def timers(host: dict[str, float], replays: list[tuple[tuple[int, int], object, object]]) -> Iterator[None]:
    """While open, add each TIMED method's host seconds to `host`, and on CUDA append (graph shape, start
    event, end event) around every graph replay to `replays`."""
    saved = [(cls, attr, getattr(cls, attr)) for _, cls, attr in TIMED]

    def timed(name, fn):
        def run(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                host[name] += time.perf_counter() - start
        return run

    for (name, cls, attr), (_, _, fn) in zip(TIMED, saved):
        setattr(cls, attr, timed(name, fn))
    host_replay = DecodeGraphs.replay

    def replay(self, step):
        if not torch.cuda.is_available():
            return host_replay(self, step)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = host_replay(self, step)
        end.record()
        replays.append(((step.layout.block_tables.shape[0], step.layout.max_query_len), start, end))
        return out

    DecodeGraphs.replay = replay
    try:
        yield
    finally:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)


def measure(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, object]:
    """Prefill the prompts, then time their decode steps until all finish: ms per step of wall time and of
    each timer, speculation's counts, and per graph shape (rows, tokens per row) its replays and median
    device ms."""
    for i, prompt in enumerate(prompts):
        llm.add_request(f"step-time-{i}", prompt, params)
    while llm.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in llm.scheduler.running):
        llm.step()
    host: dict[str, float] = defaultdict(float)
    replays: list = []
    before, steps = llm.stats(), 0
    with timers(host, replays):
        start = time.perf_counter()
        while llm.has_unfinished_requests():
            llm.step()
            steps += 1
        wall = time.perf_counter() - start
    after = llm.stats()
    if replays:
        torch.cuda.synchronize()
    device = defaultdict(list)
    for shape, begin, end in replays:
        device[shape].append(begin.elapsed_time(end))
    return {
        "steps": steps,
        "ms per step": {"wall": 1e3 * wall / steps, **{name: 1e3 * t / steps for name, t in host.items()}},
        "speculation": {k: after[k] - before[k] for k in after if k.startswith("spec_")},
        "graphs": {shape: (len(ms), statistics.median(ms)) for shape, ms in sorted(device.items())},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="preset:qwen3-0.6b")
    p.add_argument("--real-weights", action="store_true")
    p.add_argument("--num-seqs", type=int, default=1)
    p.add_argument("--ngram", type=int, default=0, metavar="K", help="speculate K tokens by prompt lookup")
    p.add_argument("--force-proposals", action="store_true", help="every step proposes K tokens (verify steps)")
    p.add_argument("--tokens", type=int, default=400, help="tokens generated per sequence")
    p.add_argument("--prompt-len", type=int, default=1500)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": args.ngram,
            "disable_by_batch_size": max(args.num_seqs, 8)} if args.ngram else None
    if args.force_proposals:
        if not args.ngram:
            p.error("--force-proposals needs --ngram K")
        NgramIndex.propose = lambda self, tokens, k: [tokens[0]] * k
    llm = LLM(args.model, load_format="auto" if args.real_weights else "dummy", speculative_config=spec,
              skip_tokenizer_init=True, **({"device": args.device} if args.device else {}))
    rng = random.Random(0)
    vocab = llm.config.hf_config.vocab_size
    pattern = [rng.randrange(vocab) for _ in range(50)]
    prompts = [(pattern * (args.prompt_len // 50 + 1))[: args.prompt_len - i] for i in range(args.num_seqs)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    measure(llm, prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    result = measure(llm, prompts, params)
    print(f"{args.num_seqs} sequences, {result['steps']} steps; ms per step: "
          + ", ".join(f"{name} {ms:.3f}" for name, ms in result["ms per step"].items()))
    if args.ngram:
        print("speculation:", result["speculation"])
    for (rows, tokens), (count, ms) in result["graphs"].items():
        print(f"graph of {rows} rows x {tokens} tokens: {count} replays, median {ms:.3f} ms of device time")


if __name__ == "__main__":
    main()
