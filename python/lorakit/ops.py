"""Typed wrappers over ``torch.ops.lorakit``: the only module that calls the native ops.

Each op also gets a fake (meta) kernel here so that ``torch.compile`` and ``FakeTensor`` can trace
it without running it. Argument checks happen in C++ (``TORCH_CHECK``) and surface as
``RuntimeError`` naming the bad argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import lorakit._native  # noqa: F401  (loads the library that defines torch.ops.lorakit)

NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _ceil_div(a: int | torch.SymInt, b: int) -> int | torch.SymInt:
    return (a + b - 1) // b


# ---- NF4 ---------------------------------------------------------------------------------------


def nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``w`` to 4-bit NormalFloat, byte for byte as bitsandbytes does.

    The flattened input is cut into blocks of ``blocksize`` values (the last one may be partial);
    each block is scaled by its absolute maximum and every value is replaced by the index of the
    nearest of 16 NF4 codes, two indices per byte, the first in the high nibble.

    NaN and Inf: a block holding a NaN gets absmax NaN and dequantizes to NaN throughout; a block
    holding ±Inf gets absmax Inf and dequantizes to +Inf at that position and NaN elsewhere. This
    is what bitsandbytes does; check weights with ``torch.isfinite`` first if that matters.

    Args:
        w: float32, float16 or bfloat16 tensor of any shape (empty included), any device.
        blocksize: one of 32, 64, ..., 4096.

    Returns:
        packed: uint8 of shape ``(ceil(numel / 2),)``.
        absmax: float32 of shape ``(ceil(numel / blocksize),)``.
    """
    return torch.ops.lorakit.nf4_quantize(w, blocksize)


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Expands NF4 data back to ``dtype``: ``code[index] * absmax[block]`` rounded once.

    Args:
        packed: uint8 ``(ceil(numel / 2),)`` as returned by :func:`nf4_quantize` (any shape with
            that many elements is accepted, e.g. bitsandbytes' ``(n, 1)``).
        absmax: float32 ``(ceil(numel / blocksize),)`` on the same device.
        blocksize: the blocksize used to quantize.
        shape: the shape of the result.
        dtype: float32, float16 or bfloat16.

    Returns:
        A tensor of ``shape`` and ``dtype`` on ``packed``'s device.
    """
    return torch.ops.lorakit.nf4_dequantize(packed, absmax, blocksize, list(shape), dtype)


@torch.library.register_fake("lorakit::nf4_quantize")
def _nf4_quantize_fake(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(blocksize in NF4_BLOCKSIZES, lambda: f"unsupported blocksize {blocksize}")
    n = w.numel()
    packed = w.new_empty((_ceil_div(n, 2),), dtype=torch.uint8)
    absmax = w.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("lorakit::nf4_dequantize")
def _nf4_dequantize_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    return packed.new_empty(shape, dtype=dtype)


# ---- blockwise 8-bit ---------------------------------------------------------------------------


def blockwise8_quantize(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x`` to 8 bits per value in blocks, in bitsandbytes' blockwise layout.

    Each block of ``blocksize`` values is divided by its absolute maximum and each value replaced
    by the index of the nearest entry of ``code`` (ties to the lower entry). A block of zeros maps
    to the entry nearest 0; a NaN makes its block's absmax NaN.

    Args:
        x: float32, float16 or bfloat16, any shape.
        code: float32 ``(256,)``, sorted ascending (e.g. :func:`lorakit.quant.dynamic_map`).
        blocksize: a power of two from 64 to 4096.

    Returns:
        q: uint8 of ``x``'s shape.
        absmax: float32 ``(ceil(numel / blocksize),)``.
    """
    return torch.ops.lorakit.blockwise8_quantize(x, code, blocksize)


def blockwise8_dequantize(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Returns ``code[q] * absmax[block]`` in ``dtype``, shaped like ``q``."""
    return torch.ops.lorakit.blockwise8_dequantize(q, absmax, code, blocksize, dtype)


@torch.library.register_fake("lorakit::blockwise8_quantize")
def _blockwise8_quantize_fake(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty_like(x, dtype=torch.uint8)
    return q, x.new_empty((_ceil_div(x.numel(), blocksize),), dtype=torch.float32)


@torch.library.register_fake("lorakit::blockwise8_dequantize")
def _blockwise8_dequantize_fake(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    return torch.empty_like(q, dtype=dtype)


# ---- optimizers --------------------------------------------------------------------------------

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


def _check_one_device(op: str, tensors: Sequence[object]) -> None:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    torch._check(len(devices) == 1, lambda: f"{op}: tensors on several devices: {devices}")


# The steps mutate their inputs in place and return nothing; the fakes only check devices, as
# the kernels do (a meta tensor among CPU ones reaches the fake kernel, not the CPU one).
@torch.library.register_fake("lorakit::adamw_step_")
def _adamw_step_fake(*args: object) -> None:
    _check_one_device("adamw_step_", args)


@torch.library.register_fake("lorakit::adamw8bit_step_")
def _adamw8bit_step_fake(*args: object) -> None:
    _check_one_device("adamw8bit_step_", args)
