"""scripts/bench_sampler.py runs against the current sampler API (it once drifted out of date unnoticed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_sampler.py"


def test_table_times_every_mode_at_every_batch():
    spec = importlib.util.spec_from_file_location("bench_sampler", SCRIPT)
    bench_sampler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_sampler)
    lines = bench_sampler.table(vocab=300, batches=[1, 3], iters=1, device="cpu")
    header, rows = lines[1], lines[3:]
    assert header.count("|") - 1 == 1 + 2 * len(bench_sampler.MODES) + 1  # batch, modes alone and +lp5, top-p flat
    assert [r.split("|")[1].strip() for r in rows] == ["1", "3"]
    for row in rows:
        cells = [float(c) for c in row.strip("| ").split("|")[1:]]
        assert len(cells) == 2 * len(bench_sampler.MODES) + 1 and all(c > 0 for c in cells)
