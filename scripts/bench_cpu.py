"""nanovllm against HF transformers `generate` on the CPU: the default model, float32, greedy.

    PYTHONPATH=$PWD python scripts/bench_cpu.py [--prompts 6] [--tokens 48] [--repeats 3] [--hf-per-prompt]

Both generate `--tokens` greedy tokens (EOS ignored) for each of `--prompts` chat prompts.
HF runs one batched `generate` with left padding and an attention mask (`--hf-per-prompt`:
one prompt at a time). Each side gets one untimed warm-up, then the best of `--repeats`
timed runs is reported. torch keeps its default thread count. The script checks that both
produced the same tokens before the first EOS (HF's `min_new_tokens` bans EOS where the
engine's `ignore_eos` picks it and goes on, so they part there).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nanovllm import LLM, SamplingParams
from nanovllm.utils.model_source import resolve_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "If I have 3 apples and buy 5 more, then eat 2, how many apples do I have?",
    "Explain what a black hole is in one paragraph.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Describe the water cycle in simple terms.",
    "Why is the sky blue?",
]


def before_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens before the first EOS."""
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


def agree(engine: list[int], hf: list[int], eos: set[int]) -> bool:
    """HF generated the engine's tokens up to the engine's first EOS."""
    prefix = before_eos(engine, eos)
    return hf[: len(prefix)] == prefix


def best_of(repeats: int, run: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    """One untimed warm-up, then the fastest of `repeats` timed runs, with its tokens."""
    tokens = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - start)
    return min(times), tokens


def hf_runner(model_dir: str, prompts: list[list[int]], max_tokens: int, per_prompt: bool,
              pad_id: int) -> Callable[[], list[list[int]]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kwargs = dict(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=pad_id)

    @torch.inference_mode()
    def one_by_one() -> list[list[int]]:
        outs = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, len(prompt):].tolist())
        return outs

    @torch.inference_mode()
    def batched() -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return model.generate(ids, attention_mask=mask, **kwargs)[:, width:].tolist()

    return one_by_one if per_prompt else batched


def engine_runner(model_dir: str, prompts: list[list[int]], max_tokens: int) -> Callable[[], list[list[int]]]:
    llm = LLM(model_dir, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def run() -> list[list[int]]:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs]

    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-per-prompt", action="store_true", help="HF generates one prompt at a time")
    args = p.parse_args()
    model_dir = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS[: args.prompts]]
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine_s, engine_tokens = best_of(args.repeats, engine_runner(model_dir, prompts, args.tokens))
    hf_s, hf_tokens = best_of(args.repeats, hf_runner(model_dir, prompts, args.tokens, args.hf_per_prompt, pad_id))
    eos_ids = GenerationConfig.from_pretrained(model_dir).eos_token_id
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    same = sum(agree(a, b, eos) for a, b in zip(engine_tokens, hf_tokens))
    mode = "one prompt at a time" if args.hf_per_prompt else "batched, left-padded"
    print(f"{args.prompts} prompts x {args.tokens} greedy tokens, float32, {torch.get_num_threads()} threads")
    print(f"nanovllm: {engine_s:.2f} s   HF generate ({mode}): {hf_s:.2f} s   "
          f"engine/HF: {engine_s / hf_s:.2f}x   same tokens before EOS: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
