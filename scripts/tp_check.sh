#!/usr/bin/env bash
# Tensor parallelism on a 2-GPU machine: the all-reduce microbenchmark, the TP GPU tests, then
# bench.py at TP=1 and TP=2 (with the one-shot all-reduce, and with NCCL only).
# Usage (repo root): bash scripts/tp_check.sh [allreduce|tests|bench|all]; logs under $OUT if set.
# Target (issue #13): on the Qwen3-8B preset, TP=2 throughput >= 1.6x TP=1.
set -uo pipefail
OUT=${OUT:-/tmp/nanovllm-tp}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    pip install -q --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
what=${1:-all}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
if [[ $what == allreduce || $what == all ]]; then
    timeout 120 python scripts/bench_all_reduce.py 2>&1 | tee "$OUT/all_reduce.log"
fi
if [[ $what == tests || $what == all ]]; then
    timeout 300 python -m pytest -q -rs -m gpu tests/distributed 2>&1 | tee "$OUT/tp_tests.log"
fi
if [[ $what == bench || $what == all ]]; then
    run() {  # name, bench.py arguments
        local name=$1; shift
        timeout 200 python bench.py --model preset:qwen3-8b "$@" 2>&1 | tee "$OUT/bench_qwen3-8b_$name.log"
    }
    run tp2 --tensor-parallel-size 2
    run tp2_nccl --tensor-parallel-size 2 --disable-custom-all-reduce
    run tp1 --tensor-parallel-size 1
    python - "$OUT" <<'PY'
import json, sys
runs = {}
for name in ("tp1", "tp2", "tp2_nccl"):
    try:
        runs[name] = json.loads(open(f"{sys.argv[1]}/bench_qwen3-8b_{name}.log").read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        print(f"{name}: no result")
if "tp1" in runs:
    for name in ("tp2", "tp2_nccl"):
        if name in runs:
            print(f"Qwen3-8B preset: {name} {runs[name]['throughput_tok_s']:.0f} tok/s against TP=1 "
                  f"{runs['tp1']['throughput_tok_s']:.0f}: {runs[name]['throughput_tok_s'] / runs['tp1']['throughput_tok_s']:.2f}x (target >= 1.6x)")
PY
fi
