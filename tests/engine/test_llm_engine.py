"""End to end on CPU: nanovllm's greedy tokens equal HF transformers', float32."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, hf_greedy

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def random_prompts(lengths: list[int], seed: int = 1, vocab: int = 384) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


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
