"""scripts/step_time.py times real engine steps (on CPU: without graphs or device events) and restores
what it instruments."""
from __future__ import annotations

from conftest import load_script

from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_runner import ModelRunner


def test_measure_times_every_decode_step(tiny_model):
    step_time = load_script("scripts/step_time.py")
    path, _ = tiny_model("qwen3")
    launch = ModelRunner.launch
    llm = LLM(path, device="cpu", skip_tokenizer_init=True, num_kvcache_blocks=64,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    prompts = [[5, 6, 7, 8] * 6, [9, 10, 11] * 5]
    result = step_time.measure(llm, prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    ms = result["ms per step"]
    assert 1 <= result["steps"] <= 12 and result["steps"] == llm.stats()["decode_steps"]
    assert ms["wall"] > ms["launch"] > 0 and ms["complete"] > 0 and "wait" in ms
    assert result["speculation"]["spec_proposed_tokens"] > 0 and result["graphs"] == {}
    assert ModelRunner.launch is launch  # the timers are gone
    assert not llm.has_unfinished_requests()
