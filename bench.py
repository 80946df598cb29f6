"""Throughput benchmark: nano-vllm's workload on the Qwen3-0.6B architecture with dummy weights.

    python bench.py                      # 256 sequences, prompts and outputs of 100..1024 tokens
    python bench.py --model PATH --num-seqs 64 --enforce-eager
    python bench.py --model PATH --workload repeat --num-seqs 1 --temperature 0 \
        --speculative-method ngram --num-speculative-tokens 4     # speculative decoding
    ... --speculative-method draft_model --draft-model DRAFT_PATH
    python bench.py --model preset:qwen3-8b --tensor-parallel-size 2    # two GPUs, dummy weights
    python bench.py --kv-report kv.png   # KV tokens stored vs slots allocated vs static reservation (`[plot]`)
    python bench.py --step-times --max-num-batched-tokens 16384   # wall / launch time per step, bigger chunks
    python bench.py --top-p 0.9 --logprobs 5   # what filtered sampling and logprobs cost a step

The `repeat` workload asks the model to repeat a 1-2k-token text of words and numbers with every
number doubled (chat template of the model's tokenizer): output that n-gram lookup can predict.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time

from nanovllm import LLM, SamplingParams
from nanovllm.attention.kv_cache import KV_CACHE_DTYPES
from nanovllm.attention.selector import BACKENDS
from nanovllm.config import PRESET_PREFIX
from nanovllm.engine.llm_engine import StepTime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preset:qwen3-0.6b", help="a model directory or preset:NAME (dummy weights)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-input-len", type=int, default=100)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--min-output-len", type=int, default=100)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step, the prefill chunk (default: the engine's, 16384)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--logprobs", type=int, default=None, help="top logprobs per token (0: the sampled token's only)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    p.add_argument("--fp8-sink-blocks", action="store_true",
                   help="with --kv-cache-dtype fp8: first blocks in float16 too")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs (ranks) the model is split over")
    p.add_argument("--disable-custom-all-reduce", action="store_true", help="every all-reduce through NCCL")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--repeat", type=int, default=1, help="timed runs, each with fresh prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", default="random", choices=["random", "repeat"])
    p.add_argument("--speculative-method", default=None, choices=["ngram", "draft_model"])
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--draft-model", default=None, help="the draft model's directory (draft_model)")
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--prompt-lookup-max", type=int, default=5)
    p.add_argument("--disable-by-batch-size", type=int, default=None,
                   help="no speculation while more sequences than this run (default: the engine's, 8)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, one more under torch.profiler: where the device time goes")
    p.add_argument("--step-times", action="store_true",
                   help="print the first timed run's wall and launch time per step, prefill steps one by one")
    p.add_argument("--kv-report", metavar="PNG", default=None,
                   help="draw the first timed run's KV use per step (matplotlib: the [plot] extra)")
    return p.parse_args(argv)


def speculative_config(args: argparse.Namespace) -> dict | None:
    if args.speculative_method is None:
        return None
    spec = {"method": args.speculative_method, "num_speculative_tokens": args.num_speculative_tokens}
    if args.disable_by_batch_size is not None:
        spec["disable_by_batch_size"] = args.disable_by_batch_size
    if args.speculative_method == "ngram":
        spec.update(prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max)
    else:
        spec["model"] = args.draft_model
    return spec


WORDS = ("the river carried boxes of apples past a quiet town where every baker counted loaves and "
         "every child kept a list of birds seen from the bridge before the market opened").split()


def repeat_prompt(llm: LLM, rng: random.Random, num_tokens: int) -> list[int]:
    """'Repeat the following text, but with every number doubled:' and ~num_tokens of words and numbers."""
    words = [str(rng.randint(1, 500)) if rng.random() < 0.15 else rng.choice(WORDS) for _ in range(num_tokens)]
    text = "Repeat the following text, but with every number doubled:\n\n" + " ".join(words)
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return llm.tokenizer.encode(chat, add_special_tokens=False)


def workload(llm: LLM, args: argparse.Namespace, run: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """nano-vllm's bench workload; run 0 is exactly its prompts (seed 0), later runs are fresh."""
    rng = random.Random(args.seed + run)
    if args.workload == "repeat":
        prompts = [repeat_prompt(llm, rng, rng.randint(args.min_input_len, args.max_input_len))
                   for _ in range(args.num_seqs)]
    else:
        top = min(10000, llm.config.hf_config.vocab_size - 1)  # nano-vllm's ids; a smaller vocabulary's own
        prompts = [[rng.randint(0, top) for _ in range(rng.randint(args.min_input_len, args.max_input_len))]
                   for _ in range(args.num_seqs)]
    params = [SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                             logprobs=args.logprobs, ignore_eos=True,
                             max_tokens=rng.randint(args.min_output_len, args.max_output_len))
              for _ in range(args.num_seqs)]
    return prompts, params


def kv_report(path: str, timeline: list[tuple[int, int, int]], max_model_len: int) -> None:
    """A PNG of a run's KV use per step: tokens stored, slots allocated in blocks, and the slots a
    static allocation of max_model_len per running sequence (as HF's cache) would reserve."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    stored, allocated, running = zip(*timeline)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(stored, label="KV tokens stored")
    ax.plot(allocated, label="KV slots allocated (paged)")
    ax.plot([n * max_model_len for n in running], label=f"static: max_model_len ({max_model_len}) per sequence")
    waste = 1 - sum(stored) / max(sum(allocated), 1)
    ax.set(xlabel="step", ylabel="tokens", title=f"KV cache use per step (paged waste {waste:.2%})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def step_times(log: list[StepTime]) -> list[str]:
    """Each kind of step's count, wall time and the host's time to launch it, and every prefill step's
    wall / launch ms: a launch near its step's wall time means the host sets the pace."""
    lines = []
    for kind in ("prefill", "decode", "verify"):
        steps = [s for s in log if s.kind == kind]
        if steps:
            wall, launch = sum(s.seconds for s in steps), sum(s.launch_seconds for s in steps)
            lines.append(f"{kind}: {len(steps)} steps, {sum(s.tokens for s in steps)} "
                         f"{'tokens' if kind == 'prefill' else 'sequence steps'}, {wall:.3f} s of wall time "
                         f"({1e3 * wall / len(steps):.2f} ms per step), {launch:.3f} s launching")
    prefill = [f"{1e3 * s.seconds:.1f}/{1e3 * s.launch_seconds:.1f}" for s in log if s.kind == "prefill"]
    if prefill:
        lines.append("prefill steps, wall / launch ms: " + " ".join(prefill))
    return lines


def timed_run(llm: LLM, args: argparse.Namespace, run: int) -> dict[str, float]:
    prompts, params = workload(llm, args, run)
    before = llm.stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = llm.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    delta = {k: after[k] - before[k] for k in ("prefill_tokens", "decode_tokens", "prefill_time", "decode_time",
                                               "decode_steps", "spec_proposed_tokens", "spec_accepted_tokens",
                                               "spec_voided_tokens")}
    return {
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "throughput_tok_s": round(tokens / seconds, 1),
        "prefill_tok_s": round(delta["prefill_tokens"] / max(delta["prefill_time"], 1e-9), 1),
        "decode_tok_s": round(delta["decode_tokens"] / max(delta["decode_time"], 1e-9), 1),
        "prefill_seconds": round(delta["prefill_time"], 3),
        "decode_seconds": round(delta["decode_time"], 3),
        "decode_ms_per_step": round(1e3 * delta["decode_time"] / max(delta["decode_steps"], 1), 3),
        "spec_proposed_tokens": delta["spec_proposed_tokens"],
        "spec_accepted_tokens": delta["spec_accepted_tokens"],
        "spec_voided_tokens": delta["spec_voided_tokens"],
    }


def profile_run(llm: LLM, args: argparse.Namespace) -> None:
    """One more run of the workload under torch.profiler: the kernels with the most device time,
    and the device time in all and per decode step, to hold against the timed runs' wall time per
    step (the profiled run's own wall time includes the profiler's overhead)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prompts, params = workload(llm, args, 2000)
    steps_before = llm.stats()["decode_steps"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6  # kernels, copies
    steps = llm.stats()["decode_steps"] - steps_before
    print(events.table(sort_by="self_device_time_total", row_limit=25))
    print(f"profiled run: {seconds:.3f} s wall, device time {busy:.3f} s; {steps} decode steps, "
          f"{1e3 * busy / max(steps, 1):.2f} ms of device time per decode step with prefill included")


def main() -> None:
    args = parse_args()
    if args.kv_report and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--kv-report draws with matplotlib: pip install -e '.[plot]'")
    if args.workload == "repeat" and args.model.startswith(PRESET_PREFIX):
        raise SystemExit(f"--workload repeat writes its prompts with the model's tokenizer and chat template; "
                         f"--model {args.model} (dummy weights) has none: pass a model directory")
    start = time.perf_counter()
    llm = LLM(args.model, load_format="dummy" if args.model.startswith(PRESET_PREFIX) else "auto",
              max_model_len=args.max_model_len, kvcache_block_size=args.block_size,
              attention_backend=args.attention_backend, kv_cache_dtype=args.kv_cache_dtype,
              fp8_sink_blocks=args.fp8_sink_blocks, enforce_eager=args.enforce_eager, device=args.device,
              skip_tokenizer_init=args.workload != "repeat", seed=args.seed,
              speculative_config=speculative_config(args), tensor_parallel_size=args.tensor_parallel_size,
              disable_custom_all_reduce=args.disable_custom_all_reduce,
              **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}))
    startup = time.perf_counter() - start
    print(f"startup: {startup:.1f} s")
    for i in range(args.warmup):
        llm.generate(*workload(llm, args, 1000 + i), use_tqdm=False)
    kv_usage = llm.scheduler.kv_usage
    kv_usage.timeline = [] if args.kv_report else None  # recorded over the first timed run
    llm.step_log = [] if args.step_times else None
    runs = []
    for run in range(args.repeat):
        runs.append(timed_run(llm, args, run))
        if run == 0:
            timeline, kv_usage.timeline = kv_usage.timeline, None
            log, llm.step_log = llm.step_log, None
    if args.profile:
        profile_run(llm, args)
    best = max(runs, key=lambda r: r["throughput_tok_s"])
    stats = llm.stats()
    result = {**best, "startup_seconds": round(startup, 1), "runs": len(runs),
              "tensor_parallel_size": args.tensor_parallel_size,
              "kv_blocks_total": stats["kv_blocks_total"], "kv_blocks_peak_used": stats["kv_blocks_peak_used"],
              "kv_blocks_used": stats["kv_blocks_used"], "kv_waste_fraction": round(stats["kv_waste_fraction"], 4)}
    print(f"output tokens: {best['output_tokens']}, time: {best['seconds']:.2f} s, "
          f"throughput: {best['throughput_tok_s']:.0f} tok/s")
    print(f"prefill: {best['prefill_tok_s']:.0f} tok/s in {best['prefill_seconds']:.2f} s, "
          f"decode: {best['decode_tok_s']:.0f} tok/s in {best['decode_seconds']:.2f} s, "
          f"{best['decode_ms_per_step']:.2f} ms per step")
    print(f"KV blocks: {stats['kv_blocks_total']} total, {stats['kv_blocks_peak_used']} peak used, "
          f"{stats['kv_blocks_used']} used now; KV waste (time-averaged empty share of allocated slots): "
          f"{stats['kv_waste_fraction']:.2%}")
    if best["spec_proposed_tokens"]:
        print(f"speculation: {best['spec_accepted_tokens']} of {best['spec_proposed_tokens']} proposed tokens "
              f"accepted ({best['spec_accepted_tokens'] / best['spec_proposed_tokens']:.0%}); "
              f"{best['spec_voided_tokens']} proposed in overlapped steps that a rollback voided")
    if args.step_times:
        print("\n".join(["step times of the first timed run:"] + step_times(log)))
    if args.kv_report:
        kv_report(args.kv_report, timeline, args.max_model_len)
        print(f"KV report: {args.kv_report}")
    print(json.dumps(result))
    llm.shutdown()


if __name__ == "__main__":
    main()
