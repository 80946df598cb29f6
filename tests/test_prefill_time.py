"""scripts/prefill_time.py times every prefill chunk of a real engine (on CPU a launch is the whole
chunk) and restores the runner's launch."""
from __future__ import annotations

import cProfile

from conftest import load_script

from nanovllm import LLM
from nanovllm.engine.model_runner import ModelRunner


def test_measure_times_every_prefill_chunk(tiny_model):
    prefill_time = load_script("scripts/prefill_time.py")
    path, _ = tiny_model("qwen3")
    llm = LLM(path, device="cpu", skip_tokenizer_init=True, num_kvcache_blocks=64, max_num_batched_tokens=48)
    prompts = prefill_time.random_prompts(4, 384, seed=3)
    assert prompts == prefill_time.random_prompts(4, 384, seed=3) and all(100 <= len(p) <= 1024 for p in prompts)
    prompts = [p[:40] for p in prompts]  # 160 prompt tokens in chunks of at most 48
    profiler = cProfile.Profile()
    chunks = prefill_time.measure(llm, prompts, profiler)
    assert sum(c["tokens"] for c in chunks) == 160 and all(0 < c["tokens"] <= 48 for c in chunks)
    assert len(chunks) >= 4 and llm.stats()["prefill_tokens"] == 160
    assert all(0 < c["launch_ms"] <= c["done_ms"] and c["seqs"] >= 1 for c in chunks)
    assert profiler.getstats()  # the launches ran under the profiler
    assert "launch" not in vars(llm.model_runner) and llm.model_runner.launch.__func__ is ModelRunner.launch
    assert not llm.has_unfinished_requests()
