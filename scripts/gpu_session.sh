#!/usr/bin/env bash
# One device call that measures what the README's performance table reports: the bench before
# (a `git archive` of an earlier commit unpacked in .whl/base, if present) and now, small batches,
# Triton bf16/FP8, nano-vllm warm in the same call, then the GPU tests. Each run's log lands in $OUT.
#
# Prepare, on the developer machine (the device has no network and no git history):
#   mkdir -p .whl && cp ../shared/flash-attn/*.whl ../shared/anchors/* .whl/
#   mkdir -p .whl/base && git archive BASE_COMMIT | tar x -C .whl/base      # optional
# then run it with `carry: [".whl"]`.
set -u
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONUNBUFFERED=1
ROOT=$PWD
SMALL="--min-input-len 128 --max-input-len 128 --min-output-len 1024 --max-output-len 1024"
nvidia-smi --query-gpu=name,memory.total --format=csv

bench() {  # bench NAME ARGS...: one bench.py run, its summary lines, the full log in $OUT
    local name=$1; shift
    echo "== $name"
    timeout 150 python bench.py "$@" > "$OUT/bench_$name.log" 2>&1
    grep -E "startup|output tokens|prefill:|KV blocks|speculation" "$OUT/bench_$name.log" | sed 's/^/   /'
}

if [[ -d .whl/base ]]; then
    (cd .whl/base && export PYTHONPATH=/tmp/site:$PWD && bench base && bench base_bs1 --num-seqs 1 $SMALL)
fi
export PYTHONPATH=/tmp/site:$ROOT
bench default
bench bs1 --num-seqs 1 $SMALL
bench bs16 --num-seqs 16 $SMALL
bench triton --attention-backend triton
bench triton_fp8 --attention-backend triton --kv-cache-dtype fp8
if [[ -f .whl/nano-vllm-bb823b3.tar.gz ]]; then
    tar xzf .whl/nano-vllm-bb823b3.tar.gz -C /tmp
    PYTHONPATH=/tmp/site python .whl/make_random_model.py /tmp/q06 > /dev/null 2>&1
    echo "== nano-vllm"
    PYTHONPATH=/tmp/site timeout 150 python .whl/run_nanovllm.py /tmp/q06 2>&1 | grep -E "startup|tok/s"
fi
echo "== GPU tests"
timeout 200 python -m pytest -q -m gpu -p no:randomly -rfE tests/engine/test_gpu_e2e.py tests/layers/test_sampler.py \
    tests/spec_decode tests/attention > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"; tail -15 "$OUT/gpu_tests.log"
