#!/usr/bin/env bash
# One prepared run of everything that needs a GPU, for the rare machine that has one (about 7 minutes
# on one H200). Everything goes under OUT_DIR; OUT_DIR/summary.json collects it.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # the same steps on the CPU, tiny sizes (CI runs this)
#
# Steps (each under its own time limit; a failing step is recorded and the next one runs):
#   env        GPU, driver, torch, CUDA, cuDNN
#   pytest     pytest -m cuda: reparameterization exactness (fp32) and tolerance (fp16/bf16), the fused FFN
#              under autocast, a training step per family with the fp16 scaler and with bf16, a one-process
#              torchrun run with nccl and --sync_bn resumed once, ONNX export of a CUDA model
#   speed_*    the seed's speed test (main.py --test_speed, with and without --reparam) for RePaViT_Base
#              and RePaViT_Large at batch 128 in fp32, then under fp16 and bf16 autocast (SDPA flash kernel)
#   bench_*    repavit bench --device cuda: vanilla, training form, ours, the class-token shortcut off,
#              the authors' design and torch.compile, in one process; then the same in fp16 with the
#              training step; the CUDA allocator's peak memory of every form; the fp32 training step of
#              every hidden-layer path, eager and compiled (compiled only on the GPU: the dry run skips it)
# PY: the Python with repavit installed (default: .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; fi
OUT=$1
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
: > "$OUT/steps.tsv"

if [ $DRY = 1 ]; then
    DEVICE=cpu; MODELS="RePaViT_Tiny"; BATCH=2; ITERS=1; SIZE=32; ROUNDS=1; LIMIT=240
    export REPAVIT_TEST_DEVICE=cpu OMP_NUM_THREADS=1
else
    DEVICE=cuda; MODELS="RePaViT_Base RePaViT_Large"; BATCH=128; ITERS=30; SIZE=224; ROUNDS=5; LIMIT=300
fi

step() {  # step NAME LIMIT_S COMMAND...: run, log to OUT/NAME.log, record rc and seconds
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    if [ $rc -ne 0 ]; then echo "   failed (rc $rc), last lines of $OUT/$name.log:"; tail -n 5 "$OUT/$name.log"; fi
}

step env 60 "$PY" benchmarks/gpu_summary.py --env "$OUT/env.json"
step pytest $((LIMIT + 60)) "$PY" -m pytest -q -m cuda tests/test_cuda.py --junitxml="$OUT/pytest.xml"

for model in $MODELS; do
    common=(main.py --model "$model" --test_speed --device "$DEVICE" --input_size "$SIZE"
            --speed_batch_size "$BATCH" --speed_iters "$ITERS")
    step "speed_${model}_fp32" "$LIMIT" "$PY" "${common[@]}" --output_dir "$OUT/speed/${model}_fp32"
    step "speed_${model}_fp32_reparam" "$LIMIT" "$PY" "${common[@]}" --reparam \
        --output_dir "$OUT/speed/${model}_fp32_reparam"
    for amp in fp16 bf16; do
        step "speed_${model}_${amp}_reparam" "$LIMIT" "$PY" "${common[@]}" --reparam --amp "$amp" \
            --output_dir "$OUT/speed/${model}_${amp}_reparam"
    done
done

bench=("$PY" -m repavit bench --models $MODELS --device "$DEVICE" --img-size "$SIZE" --batch-size "$BATCH"
       --rounds "$ROUNDS" --iters 2 --warmup 1)
step bench_fp32 $((2 * LIMIT)) "${bench[@]}" --forms vanilla train reparam reparam_all_tokens authors_design compile --output "$OUT/bench_fp32.json"
step bench_fp16 $((2 * LIMIT)) "${bench[@]}" --forms vanilla reparam reparam_all_tokens authors_design \
    --amp fp16 --train-step --train-batch-size "$BATCH" --output "$OUT/bench_fp16.json"
# The fp32 training step of every hidden-layer path against vanilla, eager and (on the GPU) compiled.
step bench_train_fp32 $((2 * LIMIT)) "${bench[@]}" --forms vanilla train --no-latency --train-step \
    --train-batch-size "$BATCH" $([ $DRY = 0 ] && echo --train-compile) --output "$OUT/bench_train_fp32.json"

"$PY" benchmarks/gpu_summary.py --summarize "$OUT" $([ $DRY = 1 ] && echo --dry-run)
