#!/usr/bin/env bash
# The benchmarks recorded in the README (`make bench`). Each line is one process: every form of a
# model is timed interleaved in it, so only ratios within one JSON file are comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
# RePaViT_Base: every inference form, batch 16 and batch 1, latency breakdown.
$PY -m repavit bench --models RePaViT_Base --batch-size 16 --rounds 5 --iters 2 \
    --forms vanilla train reparam reparam_all_tokens reference authors_design compile int8 onnxruntime \
    --breakdown \
    --output $OUT/vit_base.json --plot $OUT/vit_base.png
# Every runtime, each with the vanilla model in the same runtime (the RePa speed-up inside it), RePaViT_Base.
$PY -m repavit bench --models RePaViT_Base --batch-size 16 --rounds 3 --iters 2 --no-latency \
    --forms vanilla reparam int8 onnxruntime vanilla_onnxruntime openvino vanilla_openvino \
    onnxruntime_int8 vanilla_onnxruntime_int8 --output $OUT/runtimes.json --plot $OUT/runtimes.png
# ONNX Runtime: exporter, graph optimization levels, transformer optimizer, threads.
$PY benchmarks/ort_paths.py --model RePaViT_Base --batch-size 16 --rounds 3 --output $OUT/ort_paths.json
# RePaViT_Small: training step (batch 32) against timm's deit_small and the authors' masked FFN.
$PY -m repavit bench --models RePaViT_Small --batch-size 16 --rounds 6 --iters 2 --forms vanilla train reparam \
    --train-step --train-batch-size 32 --output $OUT/vit_small.json --plot $OUT/vit_small.png
# The training step of every hidden-layer path against vanilla, eager and compiled (README, "Training step").
for m in Small Base; do
    $PY -m repavit bench --models RePaViT_$m --forms vanilla train --no-latency --train-step --train-compile \
        --train-batch-size 32 --rounds 10 --output $OUT/train_step_$(echo $m | tr A-Z a-z)_covariance.json
done
# The other families against timm's vanilla counterparts.
$PY -m repavit bench --models RePaSwin_Tiny RePaPoolformer_s12 RePaMlpMixer_s16 --batch-size 16 --rounds 5 \
    --iters 2 --forms vanilla train reparam --output $OUT/families.json --plot $OUT/families.png
# RePa-LV-ViT-S against vanilla LV-ViT-S (LayerNorm FFN, every channel active), with ONNX Runtime.
$PY -m repavit bench --models RePaLVViT_S --batch-size 16 --rounds 5 --iters 2 --forms vanilla train reparam onnxruntime \
    --output $OUT/lvvit_s.json --plot $OUT/lvvit_s.png
# How the speed-up changes with image size and batch size.
$PY -m repavit bench --models RePaViT_Base --batch-size 16 --rounds 3 --iters 1 --forms vanilla reparam \
    --no-latency --sweep-sizes 224,384 --sweep-batches 1,16 --output $OUT/vit_base_sweep.json
# The ceiling on any FFN structure's gain over the authors' three-linear FFN (same GEMM FLOPs).
$PY benchmarks/ffn_ceiling.py --model RePaViT_Base --batch-size 16 --output $OUT/ffn_ceiling.json
# int8 on real images: the model `make demo` trains (run `make demo` first).
if [ -f out/demo/run/checkpoint.pth ]; then $PY benchmarks/int8_agreement.py; fi
