"""Beam search against HF transformers' generate(num_beams=k, do_sample=False) in float32."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, random_prompts

from nanovllm import LLM, SamplingParams
from nanovllm.beam_search_params import BeamSearchParams
from nanovllm.outputs import BeamSearchOutput

MAX = 10



def hf_beams(hf_model, prompt: list[int], params: BeamSearchParams, eos: list[int]) -> tuple[list, list]:
    """HF's beam_width finished beams, best first: (generated tokens, length-penalised scores)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=params.beam_width,
            num_return_sequences=params.beam_width, max_new_tokens=params.max_tokens,
            length_penalty=params.length_penalty, early_stopping=params.early_stopping,
            eos_token_id=eos or None, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
    tokens = [out.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)]
    return tokens, out.sequences_scores.tolist()


@pytest.fixture(scope="module")
def engines(tiny_model):
    cache = {}

    def get(name: str):
        if name not in cache:
            path, hf_model = tiny_model(name)
            cache[name] = (LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8), hf_model)
        return cache[name]

    return get


def eos_on_the_beams(hf_model, prompt: list[int], width: int) -> list[int]:
    """A token the unconstrained best beam generates early, so that EOS really ends some beams."""
    tokens, _ = hf_beams(hf_model, prompt, BeamSearchParams(width, MAX, ignore_eos=True), [])
    return [tokens[0][2]]


def check(llm, hf_model, prompts, params, eos) -> list[BeamSearchOutput]:
    llm.config.eos_token_ids = eos
    outs = llm.beam_search(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens, scores = hf_beams(hf_model, prompt, params, [] if params.ignore_eos else eos)
        assert [s.completion_token_ids for s in out.sequences] == tokens
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
        for s in out.sequences:
            assert s.tokens[: len(prompt)] == prompt and s.num_prompt_tokens == len(prompt)
            n = len(s.completion_token_ids)
            assert s.score == pytest.approx(s.cum_logprob / n**params.length_penalty, rel=1e-6)
            ended = not params.ignore_eos and s.tokens[-1] in eos
            assert s.finish_reason == ("stop" if ended else "length")
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.scheduler.running and not llm.scheduler.waiting and llm._num_sync_requests == 0
    return outs


@pytest.mark.parametrize("name", ["qwen3", "llama"])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.0, True), (2.0, "never"), (-0.5, False)])
def test_matches_hf_beam_search(engines, name, width, length_penalty, early_stopping):
    llm, hf_model = engines(name)
    prompts = random_prompts([5, 12], seed=40)
    eos = eos_on_the_beams(hf_model, prompts[0], width)
    params = BeamSearchParams(width, MAX, length_penalty=length_penalty, early_stopping=early_stopping)
    outs = check(llm, hf_model, prompts, params, eos)
    if length_penalty < 2:  # EOS ended some of the best hypotheses (a penalty of 2 favours the long ones)
        assert any(s.finish_reason == "stop" for out in outs for s in out.sequences)


@pytest.mark.parametrize("width", [2, 4])
def test_ignore_eos_runs_to_max_tokens(engines, width):
    llm, hf_model = engines("qwen3")
    prompts = random_prompts([7], seed=41)
    eos = eos_on_the_beams(hf_model, prompts[0], width)
    outs = check(llm, hf_model, prompts, BeamSearchParams(width, MAX, ignore_eos=True), eos)
    assert all(len(s.completion_token_ids) == MAX for s in outs[0].sequences)
    assert any(eos[0] in s.completion_token_ids for s in outs[0].sequences)


def test_beams_fork_and_free_blocks(tiny_model):
    """Beams share the prompt's blocks: the peak stays far below width x (prompt + generated)."""
    path, hf_model = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8)
    prompt = random_prompts([100], seed=42)  # 12 full blocks + 4 tokens
    params = BeamSearchParams(4, 12, ignore_eos=True)
    check(llm, hf_model, prompt, params, [])
    stats = llm.stats()
    assert stats["prefill_tokens"] == 100  # the prompt ran once
    assert stats["block_copies"] > 0
    # 12 shared prompt blocks; each beam privately holds at most the 3 blocks from position 96 on.
    assert stats["kv_blocks_peak_used"] <= 12 + 4 * 3 < 4 * 15


def test_small_cache_runs_prompts_in_turn(tiny_model):
    path, hf_model = tiny_model("llama")
    # each prompt may need 1 + 4 x 3 blocks of 8 at once; 20 blocks hold one prompt's search at a time
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8, num_kvcache_blocks=20)
    prompts = random_prompts([9, 14, 3], seed=43)
    check(llm, hf_model, prompts, BeamSearchParams(4, MAX, ignore_eos=True), [])
    assert llm.stats()["num_preemptions"] == 0
    # and the engine still serves ordinary requests afterwards
    out = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_fp8_cache_counts_sink_blocks(tiny_model):
    """An FP8 cache's first blocks come from its sink blocks (3 of 12 here): beams that each need their
    own first block (a prompt shorter than a block) must fit those too, or the search is refused."""
    path, _ = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8, num_kvcache_blocks=12,
              kv_cache_dtype="fp8", fp8_sink_blocks=True)
    assert llm.block_manager.num_sink_blocks == 3
    with pytest.raises(ValueError, match="4 sink blocks, the cache has 9 and 3"):
        llm.beam_search(random_prompts([5], seed=45), BeamSearchParams(4, 4, ignore_eos=True), use_tqdm=False)
    prompts = random_prompts([5, 9, 12], seed=46)  # 3 sink blocks for the first, one for each other
    outs = llm.beam_search(prompts, BeamSearchParams(3, 4, ignore_eos=True), use_tqdm=False)
    assert [len(o.sequences) for o in outs] == [3, 3, 3]
    assert llm.stats()["num_preemptions"] == 0 and llm.block_manager.num_free_blocks == 12


def test_width_one_is_greedy(engines):
    llm, hf_model = engines("qwen3")
    prompt = random_prompts([6], seed=44)[0]
    llm.config.eos_token_ids = []
    out = llm.beam_search([prompt], BeamSearchParams(1, MAX), use_tqdm=False)[0]
    assert [s.completion_token_ids for s in out.sequences] == [hf_greedy(hf_model, prompt, MAX)]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(beam_width=0, max_tokens=4), ValueError, "beam_width"),
    (dict(beam_width=2, max_tokens=0), ValueError, "max_tokens"),
    (dict(beam_width=2.0, max_tokens=4), TypeError, "beam_width"),
    (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), ValueError, "length_penalty"),
    (dict(beam_width=2, max_tokens=4, early_stopping="sometimes"), ValueError, "early_stopping"),
])
def test_bad_params(kwargs, error, match):
    with pytest.raises(error, match=match):
        BeamSearchParams(**kwargs)


def test_bad_requests_leave_engine_clean(engines):
    llm, _ = engines("qwen3")
    with pytest.raises(ValueError, match="max_model_len"):
        llm.beam_search([[1] * 1020], BeamSearchParams(2, MAX), use_tqdm=False)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search([[1, 2]], SamplingParams(), use_tqdm=False)
    llm.add_request("queued", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        llm.beam_search([[1, 2]], BeamSearchParams(2, MAX), use_tqdm=False)
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
