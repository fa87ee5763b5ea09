#!/usr/bin/env bash
# The GPU checks in one run, for a session that is lent a GPU through the device tool (about 6-8 minutes on
# an H100; every step has its own time limit and a failing step does not stop the others):
#   1. install: the C++ extension is built there, no dependency is fetched (the device has PyTorch, Triton,
#      numpy, scikit-image, safetensors, tqdm, PyYAML and no network);
#   2. bench_kernels: Triton kernels vs the PyTorch reference at ViT-B / k=8 / batch 64 / bf16, numerics
#      first (a "Numerics:" line under the table), then timings;
#   3. bench_train: ViT-B/16 MAE vs R-MAE (k=8), bf16, eager vs torch.compile, images/s and MFU (issue goals:
#      MFU >= 40%, R-MAE step <= 1.08x MAE's);
#   4. a short `python -m rmae.train` on the GPU (torch.compile on by default there), when the two wheels
#      the device lacks were carried (omegaconf, zstandard; see below);
#   5. bench_model: the model step, Triton path vs plain PyTorch.
# Everything lands in ${OUT:-benchmarks/out} as at most 8 files (the device tool returns 8): log.txt and
# the .json/.md of steps 2, 3 and 5. Copy the tables into benchmarks/RESULTS.md with the card's name.
#
# Before the device call, here (pip works here, not there), once per checkout:
#   echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl omegaconf==2.4.0 zstandard==0.25.0
# Device call: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600); then give_back.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
py=python3

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

step gpu 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
step versions 60 $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
if compgen -G ".whl/*.whl" > /dev/null; then
    step wheels 60 $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step install 180 $py -m pip install -q --no-deps --no-build-isolation -e .
step bench_kernels 150 $py benchmarks/bench_kernels.py --reps 20 --out "$out"
step bench_train 200 $py benchmarks/bench_train.py --dtypes bf16 --steps 10 --warmup 3 --out "$out/train.json"
if $py -c "import omegaconf, zstandard" 2> /dev/null; then
    step train_smoke 120 $py -m rmae.train training.max_update=30 training.save_dir=/tmp/gpu_smoke \
        training.log_interval=10 training.progress_bar=false
else
    echo "=== train_smoke: skipped (omegaconf / zstandard not carried: see the header)" | tee -a "$log"
fi
step bench_model 120 $py benchmarks/bench_model.py --steps 8 --warmup 2 --out "$out/model"
echo "=== done $(date -u +%H:%M:%S)" | tee -a "$log"
