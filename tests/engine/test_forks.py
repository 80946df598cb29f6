"""n > 1: the prompt is prefilled once and forked; branches share blocks and copy on first write."""
from __future__ import annotations

import pytest
from conftest import hf_greedy, random_prompts

from nanovllm import LLM, SamplingParams



def assert_all_free(llm: LLM) -> None:
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert not llm.scheduler.running and not llm.scheduler.waiting and not llm.requests


def test_n8_long_prompt_shares_prompt_blocks(tiny_model):
    path, _ = tiny_model("qwen3")  # max_position_embeddings 1024
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=16)
    prompt = random_prompts([1000], seed=20)[0]  # 62 full blocks + 8 tokens in a 63rd
    params = SamplingParams(n=8, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == list(range(8))
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 8  # seed + i per branch: all differ
    stats = llm.stats()
    # Each branch first writes into the shared partial block (positions 992..1007): 7 copies, the last
    # writer keeps the original. Position 1008 takes one more block per branch; the parent (which
    # sampled its first token at the prefill) has finished and freed its blocks when the children need
    # theirs, so the peak is 62 shared + 7 children x 2, far from 8 x 63.
    assert stats["block_copies"] == 7
    assert stats["kv_blocks_peak_used"] == 62 + 7 * 2
    assert stats["prefill_tokens"] == 1000  # prefilled once; the children recompute one token as a decode
    assert_all_free(llm)
    again = llm.generate([prompt], params, use_tqdm=False)[0]  # seeded: reproducible (and a prefix hit)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert_all_free(llm)


def test_n_greedy_gives_n_copies_of_hf_greedy(tiny_model):
    path, hf_model = tiny_model("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8)
    prompts = random_prompts([13, 16], seed=21)  # a partial and an exactly full last block
    outs = llm.generate(prompts, SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf_model, prompt, 12)
        assert [c.token_ids for c in out.outputs] == [expected] * 3
    assert llm.stats()["block_copies"] == 2 * 2  # n - 1 per prompt, where each child first writes
    assert_all_free(llm)


def test_fork_with_chunked_prefill_and_other_requests(tiny_model):
    path, hf_model = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8, max_num_batched_tokens=16)
    prompts = random_prompts([40, 9, 23], seed=22)
    params = [SamplingParams(n=n, temperature=0, max_tokens=8, ignore_eos=True) for n in (4, 1, 2)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, p in zip(prompts, outs, params):
        assert [c.token_ids for c in out.outputs] == [hf_greedy(hf_model, prompt, 8)] * p.n
    assert_all_free(llm)


def test_fork_under_preemption(tiny_model):
    path, hf_model = tiny_model("qwen3")
    # 2 requests x 3 branches of 20 + 24 tokens need ~36 blocks of 8; 14 force preemption by recompute.
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8, num_kvcache_blocks=14)
    prompts = random_prompts([20, 21], seed=23)
    outs = llm.generate(prompts, SamplingParams(n=3, temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert [c.token_ids for c in out.outputs] == [hf_greedy(hf_model, prompt, 24)] * 3
    assert llm.stats()["num_preemptions"] > 0
    assert_all_free(llm)


def test_n_branches_have_own_logprobs_and_seeds(tiny_model):
    path, _ = tiny_model("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    prompt = random_prompts([7], seed=24)[0]
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True, logprobs=2)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    for c in out.outputs:
        assert len(c.logprobs) == 6
        assert all(tok in entry and len(entry) in (2, 3) for tok, entry in zip(c.token_ids, c.logprobs))
        assert c.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(c.token_ids, c.logprobs)))
    # Branch i draws with seed + i: branch 1 of seed 11 is branch 0 of seed 12.
    shifted = llm.generate([prompt], SamplingParams(n=1, temperature=1.0, seed=12, max_tokens=6, ignore_eos=True),
                           use_tqdm=False)[0]
    assert shifted.outputs[0].token_ids == out.outputs[1].token_ids
    assert_all_free(llm)
