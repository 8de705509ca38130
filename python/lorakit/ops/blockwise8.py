"""Blockwise 8-bit quantization with a 256-entry code (the optimizers' state format).

Part of :mod:`lorakit.ops`, which re-exports the wrappers.
"""

from __future__ import annotations

import torch

import lorakit._native  # noqa: F401  (loads the library that defines torch.ops.lorakit)
from lorakit import op_checks as check
from lorakit.op_checks import ceil_div as _ceil_div


def blockwise8_quantize(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x`` to 8 bits per value in blocks, in bitsandbytes' blockwise layout.

    Each block of ``blocksize`` values is multiplied by the reciprocal of its absolute maximum
    (rounded once to float32, as bitsandbytes' CUDA kernels do) and each value replaced by the
    index of the nearest entry of ``code`` (ties to the lower entry). A block of zeros maps
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
    check.float_tensor("blockwise8_quantize", x, "x")
    check.blockwise8("blockwise8_quantize", x, None, code, blocksize)
    q = torch.empty_like(x, dtype=torch.uint8)
    return q, x.new_empty((_ceil_div(x.numel(), blocksize),), dtype=torch.float32)


@torch.library.register_fake("lorakit::blockwise8_dequantize")
def _blockwise8_dequantize_fake(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    op = "blockwise8_dequantize"
    torch._check(q.dtype == torch.uint8, lambda: f"{op}: q must be uint8, got {q.dtype}")
    check.blockwise8(op, q, absmax, code, blocksize)
    torch._check(dtype in check.FLOATS, lambda: f"{op}: dtype must be a float type, got {dtype}")
    return torch.empty_like(q, dtype=dtype)
