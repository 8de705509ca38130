#!/usr/bin/env bash
# The one script to run on a lent GPU machine (torch + nvcc + cmake + ninja + scikit-build-core,
# no internet): builds lorakit with its CUDA kernels for sm_90, runs every test (the CUDA ones run
# there), the CPU emulation of the same kernels (scripts/emulate_cuda.sh) and every benchmark on
# the GPU. Each step runs even when an earlier one fails; the script exits non-zero when any
# failed. Everything goes to "$OUT"/gpu_check.log (OUT is set by the device tool;
# benchmarks/results/ otherwise).
#
# Usage (from anywhere): scripts/gpu_check.sh [build] [tests] [bench] [e2e]   (default: all four)
# The device tool allows 10 minutes a command: on a warm machine the steps can run as separate
# calls (the build stays installed between them).
# bitsandbytes is not installed on the GPU machines; wheels found in wheels/ (e.g. a carried
# bitsandbytes wheel) are installed first, without dependencies and without an index.
set -uo pipefail
cd "$(dirname "$0")/.."

out_dir=${OUT:-benchmarks/results}
mkdir -p "$out_dir"
log="$out_dir/gpu_check.log"
: >"$log"

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
torch_version=$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)
commit=$(git rev-parse --verify -q HEAD 2>/dev/null) || commit=$(cat GIT_COMMIT 2>/dev/null) ||
  commit=unknown
echo "# gpu_check: gpu=${gpu:-none} torch=${torch_version:-missing} commit=${commit}" \
  "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" | tee -a "$log"

failed=()
# Runs one step, tee-ing its output into the log and remembering a failure.
step() {
  local name=$1
  shift
  echo "## ${name}: $*" | tee -a "$log"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "## ${name}: exit ${rc} after $((SECONDS - start)) s" | tee -a "$log"
  if [ "$rc" -ne 0 ]; then failed+=("$name"); fi
}

wanted=${*:-build tests bench e2e}
shopt -s nullglob
if [[ " $wanted " == *" build "* ]]; then
  for wheel in wheels/*.whl; do
    step "install $(basename "$wheel")" python -m pip install --no-deps --no-index "$wheel"
  done
  step build env LORAKIT_CUDA=on LORAKIT_CUDA_ARCHS=90 \
    python -m pip install --no-build-isolation --no-deps .
fi
if [[ " $wanted " == *" tests "* ]]; then
  # A test module that cannot be imported (bitsandbytes missing) must not stop the others.
  step tests python -m pytest -q --continue-on-collection-errors tests
  # The same kernels under the CPU emulation, one line each, to set beside the GPU's results.
  step emulated env PYTHON=python scripts/emulate_cuda.sh
fi
if [[ " $wanted " == *" bench "* ]]; then
  for bench in benchmarks/bench_*.py; do
    [ "$bench" = benchmarks/bench_e2e.py ] && continue  # its own step: it takes minutes
    step "$(basename "$bench" .py)" python "$bench" --device cuda
  done
  # Its default is a frozen head (LoRA); a full fine-tune also accumulates the head's gradient.
  step bench_fused_ce_train_head python benchmarks/bench_fused_ce.py --device cuda --train-head
fi
if [[ " $wanted " == *" e2e "* ]]; then
  # Llama-3-8B- and 70B-shaped QLoRA training and decoding (random weights, built into NF4).
  step bench_e2e python benchmarks/bench_e2e.py --device cuda --out "$out_dir/e2e_gpu.md"
fi

if [ ${#failed[@]} -ne 0 ]; then
  echo "# gpu_check: FAILED: ${failed[*]}" | tee -a "$log"
  exit 1
fi
echo "# gpu_check: all steps passed" | tee -a "$log"
