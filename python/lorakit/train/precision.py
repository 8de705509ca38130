"""Which autocast a training step runs under, on the GPU and on the CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from lorakit.cpu_features import native_bf16_flag


def uses_bf16(setting: str, device: torch.device) -> bool:
    """Whether ``--autocast setting`` means bf16 autocast on ``device``.

    ``bf16`` always does; ``auto`` does where bf16 is native (a GPU that supports it, a CPU with
    AVX-512 BF16 or AMX) and so faster than float32; ``off`` never does.
    """
    if setting == "bf16":
        return True
    if setting != "auto":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and native_bf16_flag() is not None


def autocast(setting: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context a forward pass runs in: bf16 autocast or nothing."""
    if uses_bf16(setting, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(setting: str, device: torch.device) -> str | None:
    """One line for the run's log saying that forward passes run in bf16, and why (None when
    they do not)."""
    if not uses_bf16(setting, device):
        return None
    if setting == "bf16":
        return f"bf16 autocast on {device.type} (--autocast bf16)"
    reason = native_bf16_flag() if device.type == "cpu" else "the GPU supports bf16"
    return f"bf16 autocast on {device.type} ({reason}; --autocast off for float32)"
