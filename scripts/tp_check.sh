#!/usr/bin/env bash
# Tensor parallelism on a 2-GPU machine: the TP GPU test, then bench.py at TP=1 and TP=2.
# Usage (repo root): bash scripts/tp_check.sh [tests|bench|all]; logs under $OUT if set.
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
if [[ $what == tests || $what == all ]]; then
    python -m pytest -q -rs -m gpu tests/distributed 2>&1 | tee "$OUT/tp_tests.log"
fi
if [[ $what == bench || $what == all ]]; then
    for tp in 1 2; do
        python bench.py --model preset:qwen3-8b --tensor-parallel-size $tp 2>&1 | tee "$OUT/bench_qwen3-8b_tp$tp.log"
    done
    python - "$OUT" <<'PY'
import json, sys
runs = {tp: json.loads(open(f"{sys.argv[1]}/bench_qwen3-8b_tp{tp}.log").read().strip().splitlines()[-1])
        for tp in (1, 2)}
speedup = runs[2]["throughput_tok_s"] / runs[1]["throughput_tok_s"]
print(f"Qwen3-8B preset: TP=1 {runs[1]['throughput_tok_s']:.0f} tok/s, TP=2 {runs[2]['throughput_tok_s']:.0f} tok/s, "
      f"speedup {speedup:.2f}x (target >= 1.6x)")
PY
fi
