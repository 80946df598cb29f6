"""Tensor parallelism on CPU (gloo, a real worker process): TP=2 greedy equals TP=1 and HF token for token.

One TP=2 engine on the tiny qwen3 (4 query / 2 KV heads: both split) with a small cache serves the
module: plain batches, prefix-cache hits, n > 1 copy-on-write forks and preemption, all driven by
rank 0's scheduler, whose block copies every rank applies.
"""
from __future__ import annotations

import pytest
from conftest import hf_greedy, random_prompts

from nanovllm import LLM, SamplingParams

MODEL = "qwen3"
ARGS = dict(skip_tokenizer_init=True, device="cpu", max_model_len=256, num_kvcache_blocks=12, max_num_seqs=8)
MAX_TOKENS = 12


def greedy(max_tokens: int = MAX_TOKENS, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(MODEL)


@pytest.fixture(scope="module")
def tp2(model):
    with LLM(model[0], tensor_parallel_size=2, **ARGS) as llm:
        yield llm


@pytest.fixture(scope="module")
def tp1(model):
    return LLM(model[0], **ARGS)


def token_ids(outputs) -> list[list[int]]:
    return [c.token_ids for o in outputs for c in o.outputs]


def test_greedy_matches_tp1_and_hf(model, tp1, tp2):
    prompts = random_prompts([3, 16, 29, 40])
    ours = token_ids(tp2.generate(prompts, greedy(), use_tqdm=False))
    assert ours == token_ids(tp1.generate(prompts, greedy(), use_tqdm=False))
    assert ours == [hf_greedy(model[1], p, MAX_TOKENS) for p in prompts]


def test_seeded_sampling_matches_tp1(tp1, tp2):
    """Plain temperature rows draw from each rank's vocabulary shard; top-k rows from the gathered logits."""
    prompts = random_prompts([5, 18, 33], seed=5)
    for extra in ({}, {"top_k": 20}):
        params = [SamplingParams(temperature=0.9, seed=10 + i, max_tokens=MAX_TOKENS, ignore_eos=True, **extra)
                  for i in range(len(prompts))]
        ours = token_ids(tp2.generate(prompts, params, use_tqdm=False))
        assert ours == token_ids(tp1.generate(prompts, params, use_tqdm=False))
        assert len({tuple(x) for x in ours}) == len(prompts)


def test_prefix_cache_hits(model, tp2):
    prompt = random_prompts([40], seed=2)[0]
    first = token_ids(tp2.generate([prompt], greedy(), use_tqdm=False))
    hits = tp2.stats()["prefix_hit_tokens"]
    assert token_ids(tp2.generate([prompt], greedy(), use_tqdm=False)) == first
    assert tp2.stats()["prefix_hit_tokens"] > hits
    assert first == [hf_greedy(model[1], prompt, MAX_TOKENS)]


def test_forks_copy_on_write(model, tp2):
    """n=3 greedy forks share the prompt's last, partial block: the first write copies it on every rank."""
    prompt = random_prompts([21], seed=3)[0]
    copies = tp2.stats()["block_copies"]
    out = tp2.generate([prompt], greedy(n=3), use_tqdm=False)
    assert tp2.stats()["block_copies"] > copies
    assert token_ids(out) == [hf_greedy(model[1], prompt, MAX_TOKENS)] * 3


def test_preemption(model, tp2):
    """Four sequences growing to 4 blocks each do not fit 12 blocks: some are preempted and recomputed."""
    prompts = random_prompts([40, 41, 42, 43], seed=4)
    preemptions = tp2.stats()["num_preemptions"]
    out = tp2.generate(prompts, greedy(max_tokens=20), use_tqdm=False)
    assert tp2.stats()["num_preemptions"] > preemptions
    assert token_ids(out) == [hf_greedy(model[1], p, 20) for p in prompts]
