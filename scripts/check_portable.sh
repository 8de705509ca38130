#!/usr/bin/env bash
# Checks lorakit for CPUs other than x86-64 (aarch64 ...), which get the portable (scalar) CPU
# kernels only: builds it here without the x86 kernels (-DLORAKIT_X86_KERNELS=OFF, no CUDA) and
# runs the CPU op tests with that module, then cross-compiles that build's torch-free files (the
# kernels and the instruction-set detection) for aarch64 with zig's clang. It does not run
# anything on an ARM CPU, nor compile the files that include torch for one (torch's headers are
# ARM's concern), nor check speed.
# Usage: scripts/check_portable.sh [work-dir]. Environment: PYTHON (default python);
# ZIG_UNREACHABLE_STATUS, the exit status when pip cannot fetch ziglang (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
work=${1:-build/portable-check}
ziglang=ziglang==0.17.1
mkdir -p "$work"
LORAKIT_CUDA=off PYTHON=$python \
  LORAKIT_CMAKE_ARGS="-DLORAKIT_INPLACE=OFF -DLORAKIT_X86_KERNELS=OFF" \
  scripts/dev_build.sh "$work/build" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
# The Python sources with the portable build's module beside them, ahead of any installed lorakit.
rm -rf "$work/python" && mkdir -p "$work/python"
cp -r python/lorakit "$work/python/"
rm -f "$work/python/lorakit/"_C*.so
cp "$work/build/"_C*.so "$work/build/_build_config.py" "$work/python/lorakit/"
PYTHONPATH=$(realpath "$work/python") PYTHON=$python scripts/cpu_isa_tests.sh scalar
# zig in a virtual environment of its own, so that it never lands in the project's.
zig_python=$work/zig-venv/bin/python
if [ ! -x "$zig_python" ] || ! "$zig_python" -m pip show -q ziglang 2>/dev/null; then
  "$python" -m venv "$work/zig-venv"
  if ! "$zig_python" -m pip install -q "$ziglang" >"$work/zig.log" 2>&1; then
    cat "$work/zig.log" >&2
    echo "check_portable: pip could not fetch $ziglang: the aarch64 cross-compile was NOT done" >&2
    exit "${ZIG_UNREACHABLE_STATUS:-1}"
  fi
fi
echo "== torch-free files cross-compiled for aarch64"
PATH="$(dirname "$(command -v "$python")"):$PATH" \
  "$zig_python" scripts/cross_compile_kernels.py "$work/build" aarch64-linux-gnu
