"""Fused AdamW steps, 32-bit and blockwise 8-bit state, in place.

Part of :mod:`lorakit.ops`, which re-exports the wrappers.
"""

from __future__ import annotations

import torch

import lorakit._native  # noqa: F401  (loads the library that defines torch.ops.lorakit)
from lorakit import op_checks as check

ADAMW8BIT_BLOCKSIZE = 256


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step in place, as ``torch.optim.AdamW`` computes it, in a single pass.

    ``g = grad * grad_scale``; ``param *= 1 - lr * weight_decay``; the moments are updated as
    ``m += (1 - beta1) (g - m)``, ``v = beta2 v + (1 - beta2) g^2``; then
    ``param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)``.

    Args:
        param: float32, float16 or bfloat16, contiguous; updated in place.
        grad: same dtype, shape and device as ``param``, dense and contiguous.
        exp_avg, exp_avg_sq: float32 with ``param``'s number of elements; updated in place.
        step: the number of this step, counted from 1 (bias correction).
        grad_scale: factor applied to ``grad`` first (e.g. a max-grad-norm clip coefficient).
    """
    torch.ops.lorakit.adamw_step_(
        param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, grad_scale
    )


def adamw8bit_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    exp_avg_code: torch.Tensor,
    exp_avg_sq_code: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step in place with both moments stored as blockwise 8-bit codes.

    For each block of 256 elements the moments are dequantized (``code[q] * absmax``), updated
    and used exactly as in :func:`adamw_step_`, then quantized again to the nearest code with the
    block's new absolute maximum (the layout of :func:`blockwise8_quantize` with blocksize 256).

    Args:
        param: float32, float16 or bfloat16, contiguous; updated in place.
        grad: same dtype, shape and device as ``param``.
        exp_avg, exp_avg_sq: uint8 with ``param``'s number of elements; updated in place.
        exp_avg_absmax, exp_avg_sq_absmax: float32 ``(ceil(numel / 256),)``; updated in place.
        exp_avg_code: float32 ``(256,)``, the signed dynamic map.
        exp_avg_sq_code: float32 ``(256,)``, the unsigned dynamic map.
    """
    torch.ops.lorakit.adamw8bit_step_(
        param,
        grad,
        exp_avg,
        exp_avg_absmax,
        exp_avg_sq,
        exp_avg_sq_absmax,
        exp_avg_code,
        exp_avg_sq_code,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        grad_scale,
    )


# The steps mutate their inputs in place and return nothing; the fakes only check devices, as
# the kernels do (a meta tensor among CPU ones reaches the fake kernel, not the CPU one).
@torch.library.register_fake("lorakit::adamw_step_")
def _adamw_step_fake(*args: object) -> None:
    check.one_device("adamw_step_", args)


@torch.library.register_fake("lorakit::adamw8bit_step_")
def _adamw8bit_step_fake(*args: object) -> None:
    check.one_device("adamw8bit_step_", args)
