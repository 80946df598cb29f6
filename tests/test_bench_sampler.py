"""scripts/bench_sampler.py runs against the current sampler API (it once drifted out of date unnoticed)."""
from __future__ import annotations

import pytest
from conftest import load_script


def test_table_times_every_mode_at_every_batch():
    bench_sampler = load_script("scripts/bench_sampler.py")
    lines = bench_sampler.table(vocab=300, batches=[1, 3], iters=1, device="cpu")
    header, rows = lines[1], lines[3:]
    assert header.count("|") - 1 == 1 + 2 * len(bench_sampler.MODES) + 1  # batch, modes alone and +lp5, top-p flat
    assert [r.split("|")[1].strip() for r in rows] == ["1", "3"]
    for row in rows:
        cells = [float(c) for c in row.strip("| ").split("|")[1:]]
        assert len(cells) == 2 * len(bench_sampler.MODES) + 1 and all(c > 0 for c in cells)


def test_profile_shows_where_one_modes_time_goes():
    """On CPU the sampler's torch path sorts the rows for top-k: the profile must show the sort."""
    bench_sampler = load_script("scripts/bench_sampler.py")
    title, table, summary = bench_sampler.profile_mode("top-k 50", vocab=300, batch=2, iters=2, device="cpu")
    assert title.startswith("sampler top-k 50, batch 2") and "aten::sort" in table
    assert summary.startswith("per call: ") and float(summary.split()[2]) > 0
    with pytest.raises(SystemExit, match="top-k 50"):
        bench_sampler.profile_mode("top-k", vocab=300, batch=2, iters=1, device="cpu")
    with pytest.raises(SystemExit, match="lpN"):
        bench_sampler.profile_mode("top-k 50 +lpx", vocab=300, batch=2, iters=1, device="cpu")


def test_profile_with_logprobs_computes_them():
    """With ' +lp3' the profiled calls ask for logprobs: the raw logits' logsumexp and top-k show."""
    bench_sampler = load_script("scripts/bench_sampler.py")
    _, table, _ = bench_sampler.profile_mode("temperature +lp3", vocab=300, batch=2, iters=2, device="cpu")
    assert "aten::logsumexp" in table and "aten::topk" in table
    _, plain, _ = bench_sampler.profile_mode("temperature", vocab=300, batch=2, iters=2, device="cpu")
    assert "aten::logsumexp" not in plain
