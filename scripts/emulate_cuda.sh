#!/usr/bin/env bash
# Runs every CUDA kernel on the CPU, under the project's emulation of the CUDA execution model
# (csrc/common/cuda_emulation.h), against lorakit's CPU kernels on the GPU tests' inputs. Needs no
# GPU: builds tests/emulation into build/emulation (cmake + ninja + the host compiler), then prints
# one line per kernel and a closing "N passed, M failed" line; exits non-zero when any failed.
#
# Usage: scripts/emulate_cuda.sh [--build-only] [kernel ...]
# Environment: PYTHON (default python; lorakit must be importable by it), LORAKIT_EMULATION_BUILD.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
# The cmake and ninja installed next to that Python (the system cmake may be too old).
PATH="$(dirname "$(command -v "$python")"):$PATH"
build=${LORAKIT_EMULATION_BUILD:-build/emulation}
mkdir -p "$build"
if ! { cmake -S tests/emulation -B "$build" -G Ninja \
  -DPython_EXECUTABLE="$(command -v "$python")" && cmake --build "$build"; } >"$build/build.log" 2>&1; then
  cat "$build/build.log"
  echo "emulate_cuda: building the emulated kernels failed" >&2
  exit 1
fi
if [ "${1:-}" = --build-only ]; then exit 0; fi
exec "$python" tests/emulation/run_emulated.py --lib "$build/liblorakit_emulated.so" "$@"
