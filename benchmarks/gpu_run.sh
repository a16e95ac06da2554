#!/usr/bin/env bash
# One prepared GPU measurement (about 4 minutes, at most 7.5), for a machine with torch's CUDA build and torchvision
# (no Keras or TensorFlow needed): `python -m benchmarks.gpu_profile` at batch 256 (then the plain eager TF32/fp16
# rows at batch 64, in the same process), then at batch 1, each in its own process with its own time limit, so that
# one that runs long still leaves the other's results. Everything goes under $OUT (default out/gpu): the profiles'
# JSON and Markdown, a log of each, and what nvidia-smi says of the card (7 files).
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
timeout 270 python3 -m benchmarks.gpu_profile --out "$OUT/b256" --batch-sizes 256 --eager-batch 64 2>&1 |
    tee "$OUT/log-b256.txt"
echo "batch 256: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
start=$SECONDS
timeout 170 python3 -m benchmarks.gpu_profile --out "$OUT/b1" --batch-sizes 1 2>&1 | tee "$OUT/log-b1.txt"
echo "batch 1: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
ls -la "$OUT" "$OUT"/b256 "$OUT"/b1 2>/dev/null
