"""Speculative decoding end to end on CPU (float32): greedy is token-identical to greedy without
speculation, and sampling keeps the target's distribution and its seeded tokens."""
from __future__ import annotations

import collections
import math
import random

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


@pytest.mark.parametrize("k", [1, 4, 8])
def test_overlapped_ngram_steps_are_identical(qwen3, k, monkeypatch):
    """As on a GPU, each step launches before the last one's tokens are read back: prompt lookup
    guesses that the proposals in flight are all accepted and proposes past them, and a rollback
    voids the next step's rows for the sequence. Greedy stays token-identical."""
    from nanovllm.spec_decode.ngram_proposer import NgramIndex

    path, prompts, expected = qwen3
    guesses = []
    propose_ahead = NgramIndex._propose_ahead
    monkeypatch.setattr(NgramIndex, "_propose_ahead",
                        lambda self, t, n: guesses.append(propose_ahead(self, t, n)) or guesses[-1])
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", speculative_config=ngram(k), num_kvcache_blocks=64)
    llm.overlap_steps = True
    assert tokens(llm, prompts) == expected
    stats = llm.stats()
    assert any(guesses) and stats["spec_accepted_tokens"] > 0 and stats["spec_voided_tokens"] > 0
    assert_no_leak(llm)


@pytest.fixture(scope="module")
def random_draft(tiny_model, tmp_path_factory):
    """A second tiny Qwen3 with the same vocabulary and other random weights: it almost never agrees."""
    from conftest import build_tiny_model

    path = str(tmp_path_factory.mktemp("draft"))
    build_tiny_model("qwen3", path, seed=1)
    return path


@pytest.mark.parametrize("k", [1, 3])
def test_draft_model_greedy_is_identical(qwen3, random_draft, k):
    path, prompts, expected = qwen3
    for draft, all_accepted in ((random_draft, False), (path, True)):  # the target as its own draft agrees
        llm = LLM(path, skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=64,
                  speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": k})
        assert tokens(llm, prompts) == expected
        stats = llm.stats()
        assert stats["spec_proposed_tokens"] > 0
        assert (stats["spec_accepted_tokens"] == stats["spec_proposed_tokens"]) == all_accepted
        assert_no_leak(llm)
        assert not llm.scheduler.proposer.shadows and llm.scheduler.proposer.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_through_preemption_and_prefix_hits(tiny_model, overlap):
    path, _ = tiny_model("llama")
    prefix = repetitive_prompts([12], seed=2)[0]
    prompts = [prefix + tail for tail in repetitive_prompts([2, 5, 9, 4], seed=3)]
    # ~4 sequences of ~60 tokens need ~32 blocks of 8: 16 blocks force preemption by recompute
    small = dict(skip_tokenizer_init=True, device="cpu", kvcache_block_size=8, num_kvcache_blocks=16)
    expected = tokens(LLM(path, **small), prompts)
    llm = LLM(path, speculative_config=ngram(4), **small)
    llm.overlap_steps = overlap  # preempted with a step in flight, then its proposals verified
    assert tokens(llm, prompts) == expected
    assert tokens(llm, prompts[:2]) == expected[:2]  # again: the prompts' blocks are prefix-cache hits
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_hit_tokens"] > 0 and stats["spec_accepted_tokens"] > 0
    assert_no_leak(llm)


@pytest.mark.parametrize("overlap", [False, True])
def test_sampling_params_hold_within_accepted_runs(qwen3, overlap):
    """Seeds, penalties, logprobs, stop ids and min_tokens inside an accepted run, max_tokens exactly:
    every output equals the one without speculation. Overlapped (penalties need every token's value
    before sampling, so they would turn overlap off): a greedy row with logprobs in their place."""
    path, prompts, expected = qwen3
    stop_id, early_id = expected[2][9], expected[2][3]  # tokens in the middle of a greedy output
    penalties = dict(repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1) if not overlap else {}
    params = [
        SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=17, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, **penalties, max_tokens=20, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0, stop_token_ids=[stop_id], max_tokens=24),
        SamplingParams(temperature=0, stop_token_ids=[early_id], min_tokens=6, max_tokens=24),
        SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, seed=11, max_tokens=13, ignore_eos=True),
    ]
    batch = [prompts[0], prompts[1], prompts[2], prompts[2], prompts[1]]
    base = LLM(path, skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=64)
    base = base.generate(batch, params, use_tqdm=False)
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=64, speculative_config=ngram(5))
    llm.overlap_steps = overlap
    spec = llm.generate(batch, params, use_tqdm=False)
    assert llm.stats()["spec_accepted_tokens"] > 0
    assert (llm.stats()["spec_voided_tokens"] > 0) == overlap
    for p, a, b in zip(params, base, spec):
        a, b = a.outputs[0], b.outputs[0]
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason and b.stop_reason == a.stop_reason
        assert len(b.token_ids) <= p.max_tokens
        if p.logprobs is not None:
            assert [list(e) for e in b.logprobs] == [list(e) for e in a.logprobs]
            for x, y in zip(a.logprobs, b.logprobs):
                assert list(y.values()) == pytest.approx(list(x.values()), abs=1e-4)
            assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-3)
    assert spec[2].outputs[0].token_ids[-1] == stop_id and len(spec[2].outputs[0].token_ids) <= 10
    assert len(spec[3].outputs[0].token_ids) >= 6
    assert [len(o.outputs[0].token_ids) for o in (spec[0], spec[1], spec[4])] == [17, 20, 13]
    assert_no_leak(llm)


def test_seeded_sampling_is_identical_with_a_draft_model(qwen3, random_draft):
    path, prompts, _ = qwen3
    params = [SamplingParams(temperature=t, seed=s, max_tokens=16, ignore_eos=True) for t, s in ((0.5, 1), (1.0, 2))]
    batch = prompts[:2]
    base = tokens(LLM(path, skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=64), batch, params)
    for draft in (path, random_draft):
        llm = LLM(path, skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=64,
                  speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 3})
        assert tokens(llm, batch, params) == base
        assert llm.stats()["spec_proposed_tokens"] > 0


def chi_square_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def top_k_probs(hf_model, tokens: list[int], k: int, temperature: float) -> dict[int, float]:
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0, -1].double() / temperature
    top = logits.topk(k)
    return dict(zip(top.indices.tolist(), torch.softmax(top.values, dim=0).tolist()))


def test_sampled_tokens_keep_the_target_distribution(tiny_model):
    """10^4 unseeded draws of 3 tokens, the draft (the target itself, proposing its argmax) accepted
    about half the time: the joint distribution of the three tokens is the target's."""
    path, hf_model = tiny_model("qwen3")
    prompt, k, temperature, draws = [7], 3, 1.0, 10_000  # one prompt token: its prefill is decode-shaped
    exact = {}
    for t1, p1 in top_k_probs(hf_model, prompt, k, temperature).items():
        for t2, p2 in top_k_probs(hf_model, prompt + [t1], k, temperature).items():
            for t3, p3 in top_k_probs(hf_model, prompt + [t1, t2], k, temperature).items():
                exact[(t1, t2, t3)] = p1 * p2 * p3
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", max_num_seqs=1024, num_kvcache_blocks=2048,
              kv_cache_memory_bytes=64 << 20,
              speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 2,
                                  "disable_by_batch_size": 1024})
    params = SamplingParams(temperature=temperature, top_k=k, max_tokens=3, ignore_eos=True)
    outs = tokens(llm, [prompt] * draws, params)
    stats = llm.stats()
    assert 0.2 < stats["spec_accepted_tokens"] / stats["spec_proposed_tokens"] < 0.9  # both paths taken often
    counts = collections.Counter(map(tuple, outs))
    assert sum(counts.values()) == draws and set(counts) <= set(exact)
    cells = sorted(exact, key=exact.get)
    observed = torch.tensor([counts[c] for c in cells], dtype=torch.float64)
    expected = torch.tensor([exact[c] * draws for c in cells])
    small = max(int((expected < 5).sum()), 1)  # pool the rarest cells into one bin
    observed = torch.cat([observed[:small].sum().view(1), observed[small:]])
    expected = torch.cat([expected[:small].sum().view(1), expected[small:]])
    assert len(expected) >= 10  # the test has power
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_quantile(len(observed) - 1, z=3.7)  # p ~ 1e-4


def test_overlapped_speculation_with_preemption_aborts_and_mixed_requests(qwen3):
    """Requests arriving while others run (greedy and seeded, stop ids, max_tokens, logprobs, top-k),
    some aborted mid-run, a cache small enough to preempt often; steps overlapped as on a GPU. Every
    request that finishes gives what it gives without speculation, and no block leaks."""
    path, _, _ = qwen3
    rng = random.Random(3)
    requests = []
    for _ in range(16):
        pattern = [rng.randrange(384) for _ in range(rng.randint(2, 8))]
        greedy = rng.random() < 0.6
        params = SamplingParams(temperature=0 if greedy else 0.8, seed=None if greedy else rng.randrange(100),
                                top_k=-1 if greedy else 20, max_tokens=rng.randint(1, 40), ignore_eos=True,
                                stop_token_ids=[rng.randrange(384)] if rng.random() < 0.3 else [],
                                logprobs=rng.choice([None, 2]))
        requests.append(((pattern * 6)[: rng.randint(3, 60)], params))
    aborts = {5: "3", 9: "7", 14: "12"}  # step -> request

    def run(spec: dict | None) -> tuple[dict[str, tuple[list[int], str]], LLM]:
        llm = LLM(path, skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=20, kvcache_block_size=8,
                  max_num_seqs=6, speculative_config=spec)
        llm.overlap_steps = spec is not None
        outputs, queue, steps = {}, list(enumerate(requests)), 0
        while queue or llm.has_unfinished_requests():
            while queue and len(llm.scheduler.running) + len(llm.scheduler.waiting) < 8:
                i, (prompt, params) = queue.pop(0)
                llm.add_request(str(i), prompt, params)
            for out in llm.step():  # streamed: deltas
                tokens, reason = outputs.get(out.request_id, ([], None))
                outputs[out.request_id] = (tokens + out.outputs[0].token_ids, out.outputs[0].finish_reason or reason)
            steps += 1
            if spec is not None and steps in aborts:
                llm.abort_request(aborts[steps])
        assert_no_leak(llm)
        return outputs, llm

    expected, _ = run(None)
    outputs, llm = run(ngram(4))
    finished = {rid: out for rid, out in outputs.items() if out[1] is not None}
    assert len(finished) >= 13 and all(finished[rid] == expected[rid] for rid in finished)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["spec_accepted_tokens"] > 0 and stats["spec_voided_tokens"] > 0
