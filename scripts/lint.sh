#!/usr/bin/env bash
# One formatter and linter per language, line length 100: ruff for Python, clang-format for C++/CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check
ruff format --check
git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' | xargs clang-format --dry-run --Werror
