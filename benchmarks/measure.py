"""Memory and time measurement shared by the benchmarks that run each variant in a fresh process.

Peak memory: on the CPU the growth of peak RSS (``ru_maxrss``) over the RSS when the inputs exist
(:func:`current_bytes` then, :func:`peak_bytes` after); on a GPU ``max_memory_allocated`` over
``memory_allocated`` (reset the peak with :func:`reset_peak` first). One process per variant, so
that each peak is its own.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

import torch

import lorakit


def cpu_paths() -> str:
    """Which vector code ran on the CPU: torch's dispatch level and lorakit's kernels' level."""
    return (
        f"torch ISA path {torch.backends.cpu.get_cpu_capability()}, "
        f"lorakit kernels {lorakit.cpu_isa()}"
    )


def current_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_and_times(step: Callable[[], None], device: str, repeats: int) -> tuple[int, list[float]]:
    """Runs ``step`` once for its memory peak (bytes above what is held before it), then
    ``repeats`` more times for their wall times in seconds (the first call is the warm-up)."""
    sync(device)
    base = current_bytes(device)
    reset_peak(device)
    step()
    sync(device)
    peak = peak_bytes(device) - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return peak, times
