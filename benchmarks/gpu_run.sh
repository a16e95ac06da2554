#!/usr/bin/env bash
# One prepared GPU measurement (205 s on the H200, at most 9 minutes), for a machine with torch's CUDA build and
# torchvision:
#   1. `python -m benchmarks.gpu_profile` at batch 256 (then the plain eager TF32/fp16 rows at batch 64, in the same
#      process), then at batch 1, each in its own process with its own time limit, so that one that runs long still
#      leaves the other's results (no Keras needed);
#   2. `python -m benchmarks.run` for the twin's fp16 CUDA-graph mode and the fused modes (fp16, bf16) at batches 1,
#      256 and 512, each row checked against the Keras float32 reference logits. This step needs Keras (any backend;
#      JAX computes the reference on the CPU) and is skipped, with its reason, where Keras is not installed.
# Everything goes under $OUT (default out/gpu): the profiles' JSON and Markdown, the run's results.{json,csv,md} and
# plot, a log of each step, and what nvidia-smi says of the card.
#
#   bash benchmarks/gpu_run.sh            # from the project's root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/nvidia-smi.csv" 2>&1
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available())"
# Batch 256 first: the throughput figure; inductor's compiles (freezing, default mode) are most of its time.
start=$SECONDS
timeout 180 python3 -m benchmarks.gpu_profile --out "$OUT/b256" --batch-sizes 256 --eager-batch 64 2>&1 |
    tee "$OUT/log-b256.txt"
echo "batch 256: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
start=$SECONDS
timeout 120 python3 -m benchmarks.gpu_profile --out "$OUT/b1" --batch-sizes 1 2>&1 | tee "$OUT/log-b1.txt"
echo "batch 1: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
# The library's fused modes as users time them, beside the unfused fp16 CUDA-graph row.
start=$SECONDS
if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('keras') is None)"; then
    timeout 240 python3 -m benchmarks.run --device cuda --runtimes torch \
        --modes fp16-cl-cudagraph,fp16-cl-fused-cudagraph,bf16-cl-fused-cudagraph --batch-sizes 1 256 512 \
        --min-time 2 --warmup-time 5 --worker-timeout 150 --out "$OUT/run" 2>&1 | tee "$OUT/log-run.txt"
    echo "benchmarks.run: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
else
    echo "benchmarks.run: skipped: Keras is not installed here (it computes the reference logits)"
fi
ls -la "$OUT" "$OUT"/b256 "$OUT"/b1 "$OUT"/run 2>/dev/null
