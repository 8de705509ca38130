"""NF4 (4-bit NormalFloat) quantization of float tensors, in bitsandbytes' layout.

Part of :mod:`lorakit.ops`, which re-exports the wrappers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import lorakit._native  # noqa: F401  (loads the library that defines torch.ops.lorakit)
from lorakit import op_checks as check
from lorakit.op_checks import ceil_div as _ceil_div


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
    check.float_tensor("nf4_quantize", w, "w")
    check.nf4_blocksize(blocksize)
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
    check.nf4_dequantize("nf4_dequantize", packed, absmax, blocksize, shape, dtype)
    return packed.new_empty(shape, dtype=dtype)
