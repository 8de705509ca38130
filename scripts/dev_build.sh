#!/usr/bin/env bash
# Incremental development build: compiles lorakit._C into python/lorakit so that
# `PYTHONPATH=python pytest` runs against the working tree. LORAKIT_CUDA=auto|on|off and
# LORAKIT_CUDA_ARCHS work as for pip; LORAKIT_CMAKE_ARGS adds (or overrides) cmake options.
# Usage: scripts/dev_build.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build/dev}
python=${PYTHON:-python}
# Use the cmake and ninja installed next to that Python (the system cmake may be too old).
export PATH="$(dirname "$(command -v "$python")"):$PATH"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLORAKIT_INPLACE=ON \
  -DPython_EXECUTABLE="$(command -v "$python")" \
  -DLORAKIT_CUDA="${LORAKIT_CUDA:-auto}" -DLORAKIT_CUDA_ARCHS="${LORAKIT_CUDA_ARCHS:-90}" \
  ${LORAKIT_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir"
