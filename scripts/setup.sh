#!/usr/bin/env bash
# Makes .venv (if missing), installs torch and the build and test dependencies, builds lorakit as
# a wheel (CUDA kernels included when nvcc is there) and installs that wheel into .venv.
# Environment: VENV (default .venv), LORAKIT_CUDA (auto|on|off), LORAKIT_CUDA_ARCHS (default 90
# here; the package default covers 80;86;89;90).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q "torch==2.14.1" "scikit-build-core>=0.10" ninja "cmake>=3.26"

export LORAKIT_CUDA_ARCHS=${LORAKIT_CUDA_ARCHS:-90}
rm -rf dist
pip wheel -q --no-build-isolation --no-deps -w dist .
wheel=$(ls dist/lorakit-*.whl)
pip install -q --force-reinstall --no-deps "$wheel"
pip install -q "$wheel[test,lint]"
# The wheel, not the source tree, is what gets imported from here on.
python -c "import lorakit; assert 'site-packages' in lorakit.__file__; print('installed', lorakit.build_info())"
