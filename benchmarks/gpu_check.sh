#!/usr/bin/env bash
# The GPU checks in one run, for a session that is lent a GPU through the device tool. The whole script keeps
# to a budget (GPU_CHECK_BUDGET seconds, default 400: every step's limit is cut to what is left, a step with
# under 20 s left is skipped), so a device call with timeout_s=460 ends by itself. Plan for one run: a cold start
# (a minute or more) plus the script plus the transfers use most of a task's 15 device minutes, and no machine
# starts with under 4 left. A failing step does not stop the others; the script exits 1 when any step failed, ran
# out of time or was skipped (the steps are listed at the end). Most important first:
#   1. install: the C++ extension is built there (pip install -e, else setup.py build_ext --inplace with the
#      source tree on PYTHONPATH), no dependency is fetched (the device has PyTorch, Triton, numpy,
#      scikit-image, safetensors, tqdm, PyYAML, pytest and no network);
#   2. tests/test_gpu.py: every kernel compiled for the card against its reference (fwd + bwd, fp32 without
#      TF32 and bf16), and a small R-MAE on the kernels against the plain-PyTorch path; the first compilation of
#      every kernel and autotune config happens here (~100 s), each test's result is printed as it ends;
#   3. bench_model: the model step, Triton path vs plain PyTorch (the kernels' speed-up at model level);
#   4. bench_train: ViT-B/16 MAE vs R-MAE (k=8), bf16, torch.compile rows first, then eager; images/s and MFU
#      on the card's spec peak (issue goals: MFU >= 40%, R-MAE step <= 1.08x MAE's: "step vs MAE's");
#   5. bench_kernels: Triton kernels vs the PyTorch reference at ViT-B / k=8 / batch 64 / bf16, numerics
#      first (a "Numerics:" line under the table; exit 1 outside tolerance), then timings without index checks,
#      wall clock and GPU-only (torch.profiler);
#   6. a short bf16 `python -m rmae.train` on the GPU (torch.compile on by default there), when the two
#      wheels the device lacks were carried (omegaconf, zstandard; see below).
# Everything lands in ${OUT:-benchmarks/out} as at most 8 files (the device tool returns 8): log.txt and
# the .json/.md of steps 3, 4 and 5 (4 and 5 written after every row, so a step stopped by its limit keeps its
# rows; a row that fails is recorded and the others run). Copy the tables into benchmarks/RESULTS.md with the
# card's name.
#
# Before the device call, here (pip works here, not there), once per checkout:
#   echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl omegaconf==2.4.0 zstandard==0.25.0
# Device call: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=460); then give_back.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
py=python3

budget=${GPU_CHECK_BUDGET:-400}
failed=()  # the steps that failed, ran out of time or were skipped

step() {  # step NAME SECONDS COMMAND...: run within its limit and the script's budget, log everything
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS - 5))
    if ((left < 20)); then
        echo "=== $name: skipped (${left}s of the ${budget}s budget left)" | tee -a "$log"
        failed+=("$name (skipped)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
    # SIGTERM first (rmae.train saves and stops after its update), SIGKILL 10 s later
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status$( ((status == 124 || status == 137)) && echo " (out of time)")" | tee -a "$log"
    ((status == 0)) || failed+=("$name (exit $status)")
}

step gpu 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
step versions 40 $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
if compgen -G ".whl/*.whl" > /dev/null; then
    step wheels 30 $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step install 90 $py -m pip install -q --no-deps --no-build-isolation -e .
if ! $py -c "import rmae.kernels" 2> /dev/null; then  # no editable install (a read-only environment?)
    ln -sfn ../kernels rmae/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    echo "=== install failed: rmae and rmae.kernels from the source tree" | tee -a "$log"
    step build_ext 60 $py setup.py -q build_ext --inplace  # the FH extension next to the sources
fi
if $py -c "import pytest" 2> /dev/null; then
    step gpu_tests 150 env RMAE_REQUIRE_GPU=1 $py -m pytest -v -rfE --tb=short -p no:cacheprovider tests/test_gpu.py
else
    echo "=== gpu_tests: skipped (no pytest on the device)" | tee -a "$log"
    failed+=("gpu_tests (no pytest)")
fi
step bench_model 60 $py benchmarks/bench_model.py --steps 8 --warmup 2 --out "$out/model"
# compiled first, so that the figures that matter (MFU) come before a time limit; the table's "vs" column is then
# relative to compiled bf16, not to eager as in the CPU table of RESULTS.md
step bench_train 120 $py benchmarks/bench_train.py --dtypes bf16 --compile compiled,eager --steps 10 --warmup 3 \
    --out "$out/train.json"
step bench_kernels 90 $py benchmarks/bench_kernels.py --reps 20 --out "$out"
if $py -c "import omegaconf, zstandard, rmae._fh" 2> /dev/null; then
    step train_smoke 60 $py -m rmae.train training.max_update=30 training.save_dir=/tmp/gpu_smoke \
        training.log_interval=10 training.progress_bar=false training.use_fp16=bfloat16
else
    echo "=== train_smoke: skipped (omegaconf / zstandard not carried, or no FH extension)" | tee -a "$log"
    failed+=("train_smoke (not run)")
fi
echo "=== done $(date -u +%H:%M:%S), ${SECONDS}s; ${#failed[@]} step(s) not passed${failed:+: ${failed[*]}}" \
    | tee -a "$log"
((${#failed[@]} == 0))
