#!/usr/bin/env bash
# The GPU checks in one run, for a session that is lent a GPU (about 10 minutes on an H100):
# the Triton kernels against their references at ViT-B / k=8 / batch 64 (bench_kernels checks the
# numerics first, then times), the model step (MAE vs R-MAE, Triton vs plain PyTorch) and the training
# step (eager vs compiled, fp32 vs bf16, MFU). Results land in ${OUT:-benchmarks/out}; copy the tables into
# benchmarks/RESULTS.md with the card's name.
#   bash benchmarks/gpu_check.sh            (after: pip install torch triton && pip install -e .)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
export TRITON_INTERPRET=0
timeout 240 python benchmarks/bench_kernels.py --out "$out" 2>&1 | tee "$out/bench_kernels.log"
timeout 180 python benchmarks/bench_model.py --out "$out/model" 2>&1 | tee "$out/bench_model.log"
timeout 240 python benchmarks/bench_train.py --out "$out/bench_train.json" 2>&1 | tee "$out/bench_train.log"
