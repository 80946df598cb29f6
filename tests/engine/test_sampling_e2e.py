"""Sampling end to end on CPU against HF transformers (float32): greedy, temperature draws,
seeds, logprobs, penalties, and rejected parameters."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import hf_greedy, random_prompts

from nanovllm import LLM, SamplingParams



@pytest.fixture(scope="module")
def qwen3(tiny_model):
    path, hf_model = tiny_model("qwen3")  # no EOS id: ignore_eos does not change what HF compares to
    return LLM(path, skip_tokenizer_init=True, device="cpu"), hf_model


def hf_logprobs(hf_model, tokens: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position of `tokens` (row i predicts tokens[i + 1])."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, top_k=5, top_p=0.3, min_p=0.5, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True),  # top-1 sampling is greedy
    SamplingParams(temperature=0.7, min_p=1.0, max_tokens=10, ignore_eos=True),  # so is min_p = 1
])
def test_greedy_with_filters_equals_hf_greedy(qwen3, params):
    llm, hf_model = qwen3
    prompts = random_prompts([6, 19], seed=30)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, params.max_tokens)


def chi_square_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_temperature_draws_follow_softmax(qwen3):
    llm, hf_model = qwen3
    prompt, temperature, draws = random_prompts([8], seed=31)[0], 0.25, 3000
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    params = [SamplingParams(temperature=temperature, seed=s, max_tokens=1) for s in range(draws)]
    outs = llm.generate([prompt] * draws, params, use_tqdm=False)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[0] for o in outs]), minlength=len(probs)).double()
    # Pool the tokens expected fewer than 5 times into one bin.
    expected = probs * draws
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    expected = torch.cat([expected[big], expected[~big].sum().view(1)])
    assert big.sum() >= 10  # the test has power: many well-populated bins
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_quantile(len(observed) - 1, z=3.7)  # p ~ 1e-4
    # and the draws are not degenerate: the most likely token is drawn about as often as expected
    top = int(probs.argmax())
    assert abs(counts[top] - probs[top] * draws) < 5 * math.sqrt(draws * probs[top] * (1 - probs[top]))


def test_seeded_request_ignores_batch_composition(tiny_model):
    path, _ = tiny_model("llama")
    prompt, a, b = random_prompts([9, 30, 4], seed=32)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=12, ignore_eos=True)
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.5, min_p=0.1, seed=3, max_tokens=20, ignore_eos=True)]
    mixed = llm.generate([a, prompt, b], [others[0], seeded, others[1]], use_tqdm=False)[1].outputs[0].token_ids
    chunked = LLM(path, skip_tokenizer_init=True, device="cpu", max_num_batched_tokens=5, seed=99)
    late = chunked.generate([a, b, prompt], [others[1], others[0], seeded], use_tqdm=False)[2].outputs[0].token_ids
    assert alone == mixed == late
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=8, max_tokens=12, ignore_eos=True)
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_logprobs_match_hf_log_softmax(qwen3):
    llm, hf_model = qwen3
    prompts = random_prompts([5, 21], seed=33)
    params = [SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0, repetition_penalty=1.2)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, p in zip(prompts, outs, params):
        c = out.outputs[0]
        ref = hf_logprobs(hf_model, prompt + c.token_ids)[len(prompt) - 1 : -1]
        assert len(c.logprobs) == len(c.token_ids) == 8
        for row, token, entry in zip(ref, c.token_ids, c.logprobs):
            top = row.topk(p.logprobs).indices.tolist() if p.logprobs else []
            assert list(entry) == [token] + [t for t in top if t != token]  # the sampled token first
            for t, value in entry.items():  # raw-model logprobs, whatever the penalties or temperature
                assert value == pytest.approx(float(row[t]), abs=1e-4)
        expected = float(sum(row[t] for row, t in zip(ref, c.token_ids)))
        assert c.cumulative_logprob == pytest.approx(expected, abs=1e-3)
    without = llm.generate(prompts[:1], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert without.logprobs is None and without.cumulative_logprob is None  # only when asked (vLLM)


def test_repetition_penalty_matches_hf(qwen3):
    llm, hf_model = qwen3
    prompts = random_prompts([6, 15], seed=34)
    params = SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=16, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                    min_new_tokens=16, repetition_penalty=1.8, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()
    assert llm._num_sync_requests == 0


def test_frequency_and_presence_penalties_greedy(qwen3):
    """No HF processor for these: check each greedy token against penalised teacher-forced logits."""
    llm, hf_model = qwen3
    prompt = random_prompts([5], seed=35)[0]
    params = SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.5, max_tokens=12,
                            ignore_eos=True)
    tokens = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0].float()
    for i, token in enumerate(tokens):
        counts = torch.bincount(torch.tensor(tokens[:i], dtype=torch.long), minlength=logits.shape[1]).float()
        penalised = logits[len(prompt) - 1 + i] - 1.5 * counts - 0.5 * (counts > 0).float()
        assert int(penalised.argmax()) == token
    assert len(set(tokens)) > len(set(hf_greedy(hf_model, prompt, 12)))  # the penalties did something


@pytest.mark.parametrize("kwargs, field", [
    (dict(n=0), "n"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(seed=-1), "seed"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)
