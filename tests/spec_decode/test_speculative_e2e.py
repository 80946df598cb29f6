"""Speculative decoding end to end on CPU (float32): greedy is token-identical to greedy without
speculation, and sampling keeps the target's distribution and its seeded tokens."""
from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def ngram(k: int, **extra: object) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3, **extra}


def repetitive_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    """Random token runs, each said twice, so n-gram lookups find matches."""
    g = torch.Generator().manual_seed(seed)
    return [2 * torch.randint(0, 384, (n,), generator=g).tolist() for n in lengths]


def tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = GREEDY) -> list:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def qwen3(tiny_model):
    """The tiny model's path, prompts, and its greedy tokens without speculation."""
    path, _ = tiny_model("qwen3")
    prompts = repetitive_prompts([3, 9, 20], seed=1)
    return path, prompts, tokens(LLM(path, skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=64), prompts)


def assert_no_leak(llm: LLM) -> None:
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


@pytest.mark.parametrize("k", range(1, 9))
def test_ngram_greedy_is_identical(qwen3, k):
    path, prompts, expected = qwen3
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", speculative_config=ngram(k),
              num_kvcache_blocks=64)
    assert tokens(llm, prompts) == expected
    stats = llm.stats()
    assert stats["spec_proposed_tokens"] > 0 and 0 < stats["spec_accepted_tokens"] <= stats["spec_proposed_tokens"]
    assert stats["spec_proposed_tokens"] > stats["spec_accepted_tokens"]  # rejections happened too
    assert_no_leak(llm)
