#!/usr/bin/env bash
# Runs the CPU op tests once per instruction-set level (LORAKIT_CPU_ISA), so that every copy of
# every CPU kernel is tested on this machine, not only the one its CPU picks by default (which the
# main test run covers). Usage: scripts/cpu_isa_tests.sh [level ...]; without levels, every level
# this CPU supports below its own. Environment: PYTHON (default python; lorakit importable by it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
op_tests=(tests/test_nf4_ops.py tests/test_lora_ops.py tests/test_optim_ops.py
  tests/test_fused_ce.py tests/test_merge_ops.py tests/test_blockwise8_ops.py tests/test_cpu_isa.py)
if [ $# -gt 0 ]; then
  levels=("$@")
else
  read -r -a levels <<<"$("$python" -c 'from lorakit._native import available_cpu_isas as a; print(*a()[:-1])')"
fi
for level in "${levels[@]}"; do
  echo "== CPU op tests at LORAKIT_CPU_ISA=$level"
  LORAKIT_CPU_ISA=$level "$python" -m pytest -q -p no:cacheprovider "${op_tests[@]}"
done
