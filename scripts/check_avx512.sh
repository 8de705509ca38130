#!/usr/bin/env bash
# Runs the AVX-512 kernels on a CPU without AVX-512: builds lorakit with them compiled against
# SIMDe (a portable implementation of the x86 intrinsics, from Debian's archive, checksum-pinned)
# and runs the CPU op tests at the avx512 and avx512_bf16 levels. It checks what the kernels
# compute, not their speed, nor the compiler's AVX-512 code (a CPU with AVX-512 runs that: the
# main test run and scripts/cpu_isa_tests.sh pick it up there).
# Usage: scripts/check_avx512.sh [work-dir]. Environment: PYTHON (default python);
# SIMDE_UNREACHABLE_STATUS, the exit status when SIMDe cannot be fetched (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
work=${1:-build/avx512-check}
deb_url=http://deb.debian.org/debian/pool/main/s/simde/libsimde-dev_0.8.2-3_all.deb
deb_sha256=277dcde3fb84223b7026174042646e236da42adce2fcb77031807ede8166a51e
simde=$work/simde
mkdir -p "$work"
if [ ! -f "$simde/usr/include/simde/x86/avx512.h" ]; then
  if ! curl -fsSL -o "$work/simde.deb" "$deb_url"; then
    echo "check_avx512: could not fetch $deb_url: the AVX-512 kernels were NOT checked" >&2
    exit "${SIMDE_UNREACHABLE_STATUS:-1}"
  fi
  echo "$deb_sha256  $work/simde.deb" | sha256sum --check --quiet
  dpkg-deb -x "$work/simde.deb" "$simde"
fi
LORAKIT_CUDA=off PYTHON=$python \
  LORAKIT_CMAKE_ARGS="-DLORAKIT_INPLACE=OFF -DLORAKIT_SIMDE_INCLUDE=$(realpath "$simde/usr/include")" \
  scripts/dev_build.sh "$work/build" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
# The Python sources with the SIMDe build's module beside them, ahead of any installed lorakit.
rm -rf "$work/python" && mkdir -p "$work/python"
cp -r python/lorakit "$work/python/"
rm -f "$work/python/lorakit/"_C*.so
cp "$work/build/"_C*.so "$work/build/_build_config.py" "$work/python/lorakit/"
PYTHONPATH=$(realpath "$work/python") PYTHON=$python scripts/cpu_isa_tests.sh avx512 avx512_bf16
