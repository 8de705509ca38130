"""Memory and time measurement shared by the benchmarks that run each variant in a fresh process.

Peak memory: on the CPU the growth of peak RSS (``ru_maxrss``) over the RSS when the inputs exist
(:func:`current_bytes` then, :func:`peak_bytes` after); on a GPU ``max_memory_allocated`` over
``memory_allocated`` (reset the peak with :func:`reset_peak` first). One process per variant, so
that each peak is its own.
"""

from __future__ import annotations

import os
import resource

import torch


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
