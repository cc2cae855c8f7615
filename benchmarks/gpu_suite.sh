#!/usr/bin/env bash
# Every GPU line the issues ask for, in one call: kernels against their limits (with a
# correctness column against XLA), each family's greedy tokens with the Pallas kernels against
# XLA and the start-up self-check's verdict, models against their floors, the engine's host
# overhead, and KV over JAX's transfer servers. Each step has its own time limit and its own
# files under $OUT; a step that fails is reported and the suite goes on.
#
#   bash benchmarks/gpu_suite.sh            # on the GPU machine: about 8 minutes
#   bash benchmarks/gpu_suite.sh --smoke    # anywhere: the same steps on tiny shapes (CI)
#
# $OUT/summary.md lists each step, its exit status and its seconds; $OUT/<step>.md its table,
# $OUT/<step>.log its stderr. Exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-python}
failed=0

step() {   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" >&2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
    local rc=$?
    echo "| $name | $rc | $((SECONDS - start)) | \`$*\` |" >> "$OUT/summary.md"
    [[ $rc -ne 0 ]] && failed=1 && tail -5 "$OUT/$name.log" >&2
    cat "$OUT/$name.md"
}

{
    echo "# gpu_suite $( ((SMOKE)) && echo --smoke)"
    echo
    "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
    echo
    echo "| step | exit | seconds | command |"
    echo "|---|---|---|---|"
} > "$OUT/summary.md"

if ((SMOKE)); then
    step kernels 120 "$PY" benchmarks/bench_kernels.py --smoke
    step families 240 "$PY" benchmarks/gpu_families.py --smoke --max-tokens 4
    step model_floors 120 "$PY" benchmarks/bench_model.py --model opt-tiny --dtype float32 \
        --batch-sizes 1,2 --context 32 --prefill-tokens 64 --prompt-len 32
    step engine_overhead 180 "$PY" benchmarks/bench_engine.py overhead --model opt-tiny \
        --batch-sizes 1,2 --steps 8
    step kv_transfer 180 "$PY" benchmarks/bench_kv_transfer.py --model opt-tiny \
        --dtype float32 --layouts 1x1:1x1 --blocks 1,4 --iters 1
else
    step kernels 150 "$PY" benchmarks/bench_kernels.py
    step kernels_hd64_fp32 60 "$PY" benchmarks/bench_kernels.py --dtype float32 --head-dim 64 \
        --heads 32 --prefill-tokens 2048 --decode-batches 32 --decode-contexts 1024 --reps 5
    step kernels_hd80_gqa 60 "$PY" benchmarks/bench_kernels.py --head-dim 80 --heads 32 \
        --page-size 32 --prefill-tokens 2048 --decode-batches 32 --decode-contexts 1024 --reps 5
    step families 120 "$PY" benchmarks/gpu_families.py
    step opt13b_floors 120 "$PY" benchmarks/bench_model.py --model opt-13b --dtype bfloat16 \
        --batch-sizes 1,32,256 --context 1024 --prefill-tokens 2048 --prompt-len 2048
    step llama8b_floors 120 "$PY" benchmarks/bench_model.py --model llama-3.1-8b \
        --dtype bfloat16 --batch-sizes 1,32,256 --context 1024 --prefill-tokens 2048 \
        --prompt-len 2048
    step engine_overhead 120 "$PY" benchmarks/bench_engine.py overhead --model opt-125m \
        --dtype bfloat16 --batch-sizes 1,64,256
    # Two processes on one GPU: each may take a share of its memory, not the default 75%.
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 step kv_transfer 90 "$PY" benchmarks/bench_kv_transfer.py \
        --model opt-125m --dtype bfloat16 --layouts 1x1:1x1 --blocks 1,16,256 --iters 3
fi
cat "$OUT/summary.md" >&2
exit $failed
