#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), lint, then run the whole test suite against the
# installed wheel. CUDA tests run when a GPU is present and are skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
scripts/lint.sh
python -m pytest "$@"
