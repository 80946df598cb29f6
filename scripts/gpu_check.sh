#!/usr/bin/env bash
# The whole GPU check in one device call: install flash-attn from .whl/, GPU tests, bench.
# Usage (on the device, repo root): bash scripts/gpu_check.sh [tests|bench|profile|all]; logs under $OUT if set.
set -uo pipefail
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
what=${1:-all}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
if [[ $what == tests || $what == all ]]; then
    python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [[ $what == bench || $what == all ]]; then
    python bench.py 2>&1 | tee "$OUT/bench.log"
fi
if [[ $what == profile ]]; then
    python scripts/profile_decode.py 2>&1 | tee "$OUT/profile.log"
fi
