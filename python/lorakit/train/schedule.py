"""Learning-rate schedules: multipliers of the peak rate, for torch's ``LambdaLR``."""

from __future__ import annotations

import math
from functools import partial

import torch

# Warmup, stable and decay shares of warmup-stable-decay (WSD) training (Hu et al., MiniCPM 2024).
WSD_SHARES = (0.1, 0.8, 0.1)


def cosine(step: int, total: int, warmup: int) -> float:
    """Linear warmup from ``1 / warmup`` to 1, then half a cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def wsd(step: int, total: int, warmup: int = 0) -> float:
    """Warmup over the first 10% of steps, constant for 80%, linear decay to 0 over the last 10%.

    ``warmup`` is ignored: the shares are fixed by :data:`WSD_SHARES`.
    """
    up = max(1, round(total * WSD_SHARES[0]))
    down = max(1, round(total * WSD_SHARES[2]))
    if step < up:
        return (step + 1) / up
    if step < total - down:
        return 1.0
    return max(0.0, (total - step) / down)


def constant(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then the peak rate."""
    return (step + 1) / warmup if step < warmup else 1.0


SCHEDULES = {"cosine": cosine, "wsd": wsd, "constant": constant}


def scheduler(
    optimizer: torch.optim.Optimizer, name: str, total: int, warmup_share: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` running schedule ``name`` over ``total`` steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    warmup = round(total * warmup_share)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(SCHEDULES[name], total=total, warmup=warmup)
    )
