"""bench.py end to end on CPU with a tiny model: its JSON line, the KV report's timeline and PNG, the profile."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, load_script

from nanovllm import LLM, SamplingParams

def test_kv_timeline_matches_the_waste_metric(tiny_model):
    """Per step: stored <= allocated <= a static max_model_len per running sequence; summed, the
    timeline gives the engine's own kv_waste_fraction."""
    path, _ = tiny_model("qwen3")
    llm = LLM(path, device="cpu", max_model_len=256, skip_tokenizer_init=True)
    llm.scheduler.kv_usage.timeline = timeline = []
    prompts = [[i % 300 + 1] * (20 + 17 * i) for i in range(6)]
    llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=30), use_tqdm=False)
    assert timeline and all(0 < stored <= allocated <= running * 256 for stored, allocated, running in timeline)
    assert any(stored < allocated for stored, allocated, _ in timeline)  # partly filled tail blocks
    waste = 1 - sum(t[0] for t in timeline) / sum(t[1] for t in timeline)
    assert waste == pytest.approx(llm.stats()["kv_waste_fraction"])


def test_bench_cli_with_kv_report(tiny_model, tmp_path):
    path, _ = tiny_model("qwen3")
    png = tmp_path / "kv.png"
    cmd = [sys.executable, "bench.py", "--model", path, "--device", "cpu", "--num-seqs", "4",
           "--min-input-len", "8", "--max-input-len", "40", "--min-output-len", "4", "--max-output-len", "24",
           "--max-model-len", "256", "--warmup", "0", "--repeat", "2", "--kv-report", str(png), "--profile",
           "--step-times", "--max-num-batched-tokens", "32"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "aten::mm" in run.stdout and "profiled run:" in run.stdout  # the profile's table and summary
    assert "step times of the first timed run:" in run.stdout and "prefill steps, wall / launch ms: " in run.stdout
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["runs"] == 2 and result["output_tokens"] >= 16 and result["kv_blocks_used"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_cli_fp8_with_sink_blocks(tiny_model):
    path, _ = tiny_model("qwen3")
    cmd = [sys.executable, "bench.py", "--model", path, "--device", "cpu", "--num-seqs", "3", "--min-input-len", "8",
           "--max-input-len", "30", "--min-output-len", "4", "--max-output-len", "12", "--max-model-len", "128",
           "--warmup", "0", "--kv-cache-dtype", "fp8", "--fp8-sink-blocks"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["output_tokens"] >= 12
    # no fp8: refused
    bad = subprocess.run(cmd[:-3] + ["--fp8-sink-blocks"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "fp8_sink_blocks=True needs kv_cache_dtype='fp8'" in bad.stderr


def test_bench_cli_refuses_the_repeat_workload_without_a_tokenizer():
    """A preset has dummy weights and no tokenizer: refused before any startup work (it used to fail on a
    None tokenizer after loading the model)."""
    cmd = [sys.executable, "bench.py", "--model", "preset:qwen3-0.6b", "--device", "cpu", "--workload", "repeat"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--workload repeat writes its prompts with the model's tokenizer" in run.stderr
    assert "startup:" not in run.stdout


def test_step_log_counts_every_step(tiny_model):
    """Prefill chunks within max_num_batched_tokens that add up to the prompts, one decode entry per
    step with its sequences, and launches no longer than their steps (CPU: nothing overlaps)."""
    path, _ = tiny_model("qwen3")
    llm = LLM(path, device="cpu", max_model_len=256, max_num_batched_tokens=64, skip_tokenizer_init=True)
    llm.step_log = log = []
    prompts = [[i % 300 + 1] * (30 + 25 * i) for i in range(4)]
    before = llm.stats()
    llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=5), use_tqdm=False)
    prefill = [s for s in log if s.kind == "prefill"]
    assert sum(s.tokens for s in prefill) == sum(map(len, prompts)) and all(s.tokens <= 64 for s in prefill)
    assert len(prefill) >= -(-sum(map(len, prompts)) // 64)
    decode = [s for s in log if s.kind == "decode"]
    after = llm.stats()
    assert len(decode) == after["decode_steps"] - before["decode_steps"]
    assert sum(s.tokens for s in decode) == after["decode_tokens"] - before["decode_tokens"]
    assert all(0 < s.launch_seconds <= s.seconds for s in log)
    assert sum(s.seconds for s in prefill) == pytest.approx(after["prefill_time"] - before["prefill_time"])


def test_step_times_summary():
    bench = load_script("bench.py")
    step = bench.StepTime
    lines = bench.step_times([step("prefill", 0.020, 0.008, 64), step("prefill", 0.010, 0.009, 30),
                              step("decode", 0.004, 0.001, 3), step("decode", 0.006, 0.001, 2)])
    assert lines == ["prefill: 2 steps, 94 tokens, 0.030 s of wall time (15.00 ms per step), 0.017 s launching",
                     "decode: 2 steps, 5 sequence steps, 0.010 s of wall time (5.00 ms per step), 0.002 s launching",
                     "prefill steps, wall / launch ms: 20.0/8.0 10.0/9.0"]


def test_speculation_keeps_the_engine_defaults_unless_given():
    bench = load_script("bench.py")
    assert bench.speculative_config(bench.parse_args([])) is None
    config = bench.speculative_config(bench.parse_args(["--speculative-method", "ngram"]))
    assert "disable_by_batch_size" not in config  # the engine's default (8) applies
    args = bench.parse_args(["--speculative-method", "ngram", "--disable-by-batch-size", "16"])
    config = bench.speculative_config(args)
    assert config["disable_by_batch_size"] == 16


def test_workload_takes_the_sampling_flags(tiny_model):
    bench = load_script("bench.py")
    path, _ = tiny_model("qwen3")
    llm = LLM(path, device="cpu", max_model_len=256, skip_tokenizer_init=True)
    plain = bench.workload(llm, bench.parse_args(["--num-seqs", "3"]), 0)[1][0]
    assert (plain.temperature, plain.top_k, plain.top_p, plain.min_p, plain.logprobs) == (0.6, 0, 1.0, 0.0, None)
    args = bench.parse_args(["--num-seqs", "3", "--top-k", "50", "--top-p", "0.9", "--min-p", "0.05", "--logprobs", "5"])
    _, params = bench.workload(llm, args, 0)
    assert all((p.top_k, p.top_p, p.min_p, p.logprobs) == (50, 0.9, 0.05, 5) for p in params)
