"""What the CPU this process runs on can do, read once from the kernel's view of it.

PyTorch reports its own dispatch level (``torch.backends.cpu.get_cpu_capability()``) but not
whether the CPU computes in bf16 natively; that flag decides whether bf16 autocast pays off.
"""

from __future__ import annotations

import functools
from pathlib import Path

# AVX-512 BF16 (Zen 4+, Cooper Lake+) and AMX (Sapphire Rapids+) multiply bf16 in hardware; on
# other CPUs a bf16 matmul converts to float32 and back and is slower than float32 itself.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16_flag() -> str | None:
    """The flag that says this CPU multiplies bf16 in hardware, or None."""
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags()), None)
