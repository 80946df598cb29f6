"""End to end on CPU: nanovllm's greedy tokens equal HF transformers', float32."""
from __future__ import annotations

import logging
import pathlib

import pytest
from conftest import TINY_MODELS, hf_greedy, random_prompts

from nanovllm import LLM, BeamSearchParams, RequestOutput, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)



def check_against_hf(hf_model, llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> None:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for output, prompt in zip(outputs, prompts):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, params.max_tokens)
        assert output.outputs[0].finish_reason == "length" and output.finished


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_greedy_matches_hf(tiny_model, name):
    path, hf_model = tiny_model(name)
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    check_against_hf(hf_model, llm, random_prompts([5, 17, 40, 33, 1]))


def test_preemption_keeps_tokens_exact(tiny_model):
    path, hf_model = tiny_model("qwen3")
    # 4 sequences of ~50 tokens need ~16 blocks of 16; 9 blocks force preemption by recompute.
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8, num_kvcache_blocks=14)
    check_against_hf(hf_model, llm, random_prompts([20, 25, 30, 12], seed=2))
    assert llm.stats()["num_preemptions"] > 0
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_shared_prefix_hits_cache(tiny_model):
    path, hf_model = tiny_model("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=16)
    prefix = random_prompts([48], seed=3)[0]
    first = [prefix + tail for tail in random_prompts([5], seed=4)]
    check_against_hf(hf_model, llm, first)
    before = llm.stats()["prefix_hit_tokens"]
    second = [prefix + tail for tail in random_prompts([7, 20], seed=5)]
    check_against_hf(hf_model, llm, second)
    assert llm.stats()["prefix_hit_tokens"] - before == 2 * 48  # 3 full blocks each


def test_fully_cached_prompt_recomputes_last_token(tiny_model):
    path, hf_model = tiny_model("qwen2")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=16)
    prompt = random_prompts([32], seed=6)
    check_against_hf(hf_model, llm, prompt)
    check_against_hf(hf_model, llm, prompt)
    assert llm.stats()["prefix_hit_tokens"] == 16  # the block holding the last token is recomputed


@pytest.mark.parametrize("budget", [7, 16])
def test_chunked_prefill(tiny_model, budget):
    path, hf_model = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", max_num_batched_tokens=budget)
    check_against_hf(hf_model, llm, random_prompts([40, 9, 23], seed=7))


def test_max_num_seqs_one(tiny_model):
    path, hf_model = tiny_model("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", max_num_seqs=1)
    check_against_hf(hf_model, llm, random_prompts([10, 12], seed=8))


def test_eos_and_max_tokens_finish(tiny_model):
    path, hf_model = tiny_model("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    prompt = random_prompts([10], seed=9)
    greedy = hf_greedy(hf_model, prompt[0], 8)
    k = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])
    llm.config.eos_token_ids = [greedy[k]]  # the first greedy token not seen before ends the sequence
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[: k + 1] and out.finish_reason == "stop"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=k), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[:k] and out.finish_reason == "length"


def test_outputs_in_prompt_order_and_dict_access(tiny_model):
    path, _ = tiny_model("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    prompts = random_prompts([30, 3, 12], seed=10)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 9, 5)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == [2, 9, 5]
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert outputs[0]["text"] == ""  # no tokenizer


def test_temperature_sampling_is_seeded_by_engine_seed(tiny_model):
    path, _ = tiny_model("llama")
    prompts = random_prompts([6, 6], seed=11)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = [LLM(path, skip_tokenizer_init=True, device="cpu", seed=s).generate(prompts, params, use_tqdm=False)
            for s in (0, 0, 1)]
    tokens = [[o.outputs[0].token_ids for o in run] for run in runs]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]


@pytest.mark.parametrize(
    "prompts, params, error, match",
    [
        ([[]], GREEDY, ValueError, "empty"),
        ([[1] * 300], GREEDY, ValueError, "300.*max_model_len=256"),
        ([[1] * 250], GREEDY, ValueError, r"250.*32.*max_model_len=256"),
        ([[1, -1]], GREEDY, ValueError, "-1"),
        ([[1, 384]], GREEDY, ValueError, "384"),
        ([[1, 2]], None, ValueError, "max_tokens"),
        ([[1, 2]], None, ValueError, "temperature"),
        (42, GREEDY, TypeError, "prompts"),
        ([[1, 2.5]], GREEDY, TypeError, "prompt"),
        (["text without tokenizer"], GREEDY, ValueError, "tokenizer"),
        ([[1], [2]], [GREEDY], ValueError, "one per prompt"),
    ],
)
def test_bad_input_raises_then_engine_still_serves(tiny_model, prompts, params, error, match):
    path, hf_model = tiny_model("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", max_model_len=256)
    with pytest.raises(error, match=match):
        if params is None:
            params = SamplingParams(max_tokens=0) if match == "max_tokens" else SamplingParams(temperature=-1)
        llm.generate(prompts, params, use_tqdm=False)
    check_against_hf(hf_model, llm, random_prompts([7], seed=12))


def test_unknown_engine_arg_is_type_error(tiny_model):
    path, _ = tiny_model("llama")
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(path, max_num_sequences=4)


def test_bad_model_paths(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="missing"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))


# -- the engine core: request ids, abort, deltas -------------------------------------------------


def drain(llm: LLM) -> dict[str, RequestOutput]:
    """Step until idle, merging each request's deltas; checks a finished request sends nothing after."""
    merged: dict[str, RequestOutput] = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            assert not (out.request_id in merged and merged[out.request_id].finished), "output after finish"
            if out.request_id in merged:
                merged[out.request_id].add(out)
            else:
                merged[out.request_id] = out
    return merged


def test_decode_steps_are_counted(tiny_model):
    """bench.py's ms per step: one decode step per token after the first (which the prefill samples)."""
    llm = LLM(tiny_model("qwen3")[0], skip_tokenizer_init=True, device="cpu")
    llm.generate(random_prompts([9, 14], seed=75), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                 use_tqdm=False)
    stats = llm.stats()
    assert stats["decode_steps"] == 5 and stats["decode_tokens"] == 2 * 5 and stats["decode_time"] > 0


def test_startup_phases_are_timed_and_logged(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="nanovllm.engine.model_runner"):
        llm = LLM(tiny_model("qwen3")[0], skip_tokenizer_init=True, device="cpu", kv_cache_dtype="fp8")
    phases = llm.model_runner.startup_seconds
    assert list(phases) == ["load", "FP8 calibration", "warm-up", "KV cache"]  # no CUDA graphs on CPU
    assert all(t >= 0 for t in phases.values())
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("startup: "))
    assert all(f"{name} " in line for name in phases)


def test_unstreamed_request_gives_one_whole_output(tiny_model):
    """stream=False (what generate uses): one output per request, when it finishes, equal to the
    streamed request's deltas joined; a streamed request beside it still gets its deltas."""
    path, _ = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    prompt = random_prompts([12], seed=72)[0]
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=1, n=2)
    with pytest.raises(TypeError, match="stream must be a bool"):
        llm.add_request("bad", prompt, params, stream=1)
    llm.add_request("whole", prompt, params, stream=False)
    llm.add_request("deltas", prompt, params)
    counts = {"whole": 0, "deltas": 0}
    merged: dict[str, RequestOutput] = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            counts[out.request_id] += 1
            if out.request_id == "whole":
                assert out.finished
            merged.setdefault(out.request_id, RequestOutput(out.request_id, out.prompt, out.prompt_token_ids))
            merged[out.request_id].add(out)
    assert counts["whole"] == 1 and counts["deltas"] >= params.max_tokens
    whole, deltas = merged["whole"], merged["deltas"]
    for w, d in zip(sorted(whole.outputs, key=lambda c: c.index), sorted(deltas.outputs, key=lambda c: c.index)):
        assert len(w.token_ids) == params.max_tokens and w.finish_reason == "length"
        assert (w.token_ids, w.logprobs, w.cumulative_logprob) == (d.token_ids, d.logprobs, d.cumulative_logprob)
    assert llm.stats()["kv_blocks_used"] == 0 and not llm.requests


def test_step_deltas_join_to_generate(tiny_model):
    path, hf_model = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    prompts = random_prompts([5, 30], seed=70)
    llm.add_request("a", prompts[0], GREEDY)
    llm.add_request("b", prompts[1], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2, n=2))
    seen = []
    merged: dict[str, RequestOutput] = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            for c in out.outputs:
                assert c.token_ids, "a delta carries new tokens"
                assert (c.finish_reason is not None) == (out.finished or c.finish_reason is not None)
            seen.append(out.request_id)
            merged.setdefault(out.request_id, RequestOutput(out.request_id, out.prompt, out.prompt_token_ids))
            merged[out.request_id].add(out)
    assert seen.count("a") == GREEDY.max_tokens  # one new token per step
    a, b = merged["a"].outputs[0], merged["b"]
    assert a.token_ids == hf_greedy(hf_model, prompts[0], GREEDY.max_tokens) and a.finish_reason == "length"
    assert sorted(c.index for c in b.outputs) == [0, 1] and b.finished
    for c in b.outputs:  # greedy n=2: both children equal HF, with one logprob entry per token
        assert c.token_ids == hf_greedy(hf_model, prompts[1], 9) and len(c.logprobs) == 9
    assert llm.stats()["kv_blocks_used"] == 0 and not llm.requests


def test_request_ids_are_the_callers(tiny_model):
    path, _ = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    llm.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="'x' is already in use"):
        llm.add_request("x", [4, 5], SamplingParams(max_tokens=2))
    with pytest.raises(TypeError, match="request_id"):
        llm.add_request(7, [4, 5])
    assert list(drain(llm)) == ["x"]
    llm.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2))  # free again once finished
    assert list(drain(llm)) == ["x"]


def test_abort_frees_blocks_at_once_and_others_run_on(tiny_model):
    path, hf_model = tiny_model("llama")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", kvcache_block_size=8)
    prompts = random_prompts([40, 12], seed=71)
    llm.add_request("doomed", prompts[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    llm.add_request("kept", prompts[1], GREEDY)
    for _ in range(3):
        llm.step()
    used = llm.stats()["kv_blocks_used"]
    llm.abort_request("doomed")
    llm.abort_request("never-existed")  # unknown ids are ignored
    assert llm.stats()["kv_blocks_used"] <= used - 40 // 8
    outputs = drain(llm)
    assert "doomed" not in outputs
    assert outputs["kept"].outputs[0].token_ids[-GREEDY.max_tokens + 3:] == \
        hf_greedy(hf_model, prompts[1], GREEDY.max_tokens)[3:]
    assert llm.stats()["kv_blocks_used"] == 0


def test_generate_returns_exactly_its_own_requests(tiny_model):
    """A request queued by add_request does not end generate early; its output stays for step()."""
    path, hf_model = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    early, mine = random_prompts([6], seed=72)[0], random_prompts([25, 9], seed=73)
    llm.add_request("early", early, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    outputs = llm.generate(mine, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == mine
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf_model, p, GREEDY.max_tokens) for p in mine]
    rest = drain(llm)
    assert rest["early"].outputs[0].token_ids == hf_greedy(hf_model, early, 2) and rest["early"].finished


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_generate_cleans_up(tiny_model, monkeypatch, error):
    path, hf_model = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu")
    prompts = random_prompts([12, 30, 7], seed=74)
    launch, calls = llm.model_runner.launch, []

    def failing(batch):
        calls.append(1)
        if len(calls) == 4:
            raise error
        return launch(batch)

    monkeypatch.setattr(llm.model_runner, "launch", failing)
    with pytest.raises(type(error)):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not llm.requests and not llm.scheduler.has_work() and llm.stats()["kv_blocks_used"] == 0
    monkeypatch.setattr(llm.model_runner, "launch", launch)
    for _ in range(2):  # every later call returns exactly its own, correct outputs
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf_model, p, GREEDY.max_tokens) for p in prompts]
    assert llm.beam_search([prompts[0]], BeamSearchParams(2, 4), use_tqdm=False)  # not "needs an idle engine"


def test_params_are_checked_when_added(tiny_model):
    path, _ = tiny_model("qwen3")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", max_num_seqs=4)
    params = SamplingParams()
    params.max_tokens = 0  # changed after construction
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[1, 2]], params, use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs=21 is over max_logprobs=20"):
        llm.generate([[1, 2]], SamplingParams(logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="beam_width=5 is over max_num_seqs=4"):
        llm.beam_search([[1, 2]], BeamSearchParams(5, 4), use_tqdm=False)
    assert not llm.requests and llm.stats()["kv_blocks_used"] == 0
    wide = LLM(path, skip_tokenizer_init=True, device="cpu", max_logprobs=30)
    out = wide.generate([[1, 2]], SamplingParams(max_tokens=1, logprobs=25), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs[0]) >= 25


def test_model_path_may_be_a_pathlike(tiny_model):
    path, hf_model = tiny_model("qwen2")
    llm = LLM(pathlib.Path(path), skip_tokenizer_init=True, device="cpu")
    prompt = random_prompts([8], seed=75)[0]
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        hf_greedy(hf_model, prompt, GREEDY.max_tokens)
    with pytest.raises(TypeError, match="int"):
        LLM(3, device="cpu")


def test_fp8_sink_blocks_through_prefix_hits_and_forks(tiny_model):
    """An FP8 cache's first blocks live in float16 sink blocks: a prefix-cache hit on them, and forks
    that copy them on write (n = 2 over a prompt shorter than a block), give the tokens a fresh run
    gives, and only first blocks are sink blocks."""
    path, _ = tiny_model("qwen3")
    args = dict(skip_tokenizer_init=True, device="cpu", kv_cache_dtype="fp8", fp8_sink_blocks=True, kvcache_block_size=8)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    long_prompt, short_prompt = random_prompts([30, 5], seed=76)
    llm = LLM(path, **args)
    sinks = llm.block_manager.num_sink_blocks
    assert sinks > 0 and llm.model_runner.kv_cache.sinks is not None
    first = llm.generate([long_prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    hits = llm.stats()["prefix_hit_tokens"]
    assert llm.generate([long_prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids == first
    assert llm.stats()["prefix_hit_tokens"] > hits  # the second run read the first block's sink copy
    copies = llm.stats()["block_copies"]
    forked = llm.generate([short_prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2),
                          use_tqdm=False)[0].outputs
    assert llm.stats()["block_copies"] > copies  # the partial first block was copied on write
    alone = LLM(path, **args).generate([short_prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert [c.token_ids for c in forked] == [alone, alone]
