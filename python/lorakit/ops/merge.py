"""Merging a LoRA adapter into its dense or NF4 base weight.

Part of :mod:`lorakit.ops`, which re-exports the wrappers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import lorakit._native  # noqa: F401  (loads the library that defines torch.ops.lorakit)
from lorakit import op_checks as check


def lora_merge_(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> None:
    """``weight += scale · lora_b @ lora_a`` in place; ``scale = -s`` undoes a merge with ``s``.

    The product is summed in float32 and the sum rounded once to the weight's dtype, so a merge
    followed by an unmerge restores the weight to within one rounding of its dtype.

    Args:
        weight: ``(out, in)``, float32, float16 or bfloat16, contiguous; updated in place.
        lora_a: ``(r, in)``, any of those dtypes, on weight's device.
        lora_b: ``(out, r)``.
        scale: the adapter's scale (``alpha / r`` or ``alpha / sqrt(r)``), negated to unmerge.
    """
    check.finite_scale("lora_merge_", scale)
    torch.ops.lorakit.lora_merge_(weight, lora_a, lora_b, scale)


def nf4_lora_merge(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of ``W + scale · lora_b @ lora_a`` for an NF4 weight ``W``.

    Each block is expanded to float32, updated in float32 and quantized again exactly as
    :func:`nf4_quantize` quantizes a float32 tensor, so the result is bitsandbytes' NF4 of the
    merged weight (one more rounding to the 16 codes per value; see the NF4 merge drift test).

    Args:
        packed, absmax, blocksize: the weight as in :func:`nf4_dequantize` (float32 absmax).
        shape: ``(out, in)``.
        lora_a: ``(r, in)``; lora_b: ``(out, r)``; float32, float16 or bfloat16.

    Returns:
        packed: uint8 ``(ceil(out * in / 2),)``; absmax: float32 ``(ceil(out * in / blocksize),)``.
    """
    check.finite_scale("nf4_lora_merge", scale)
    return torch.ops.lorakit.nf4_lora_merge(
        packed, absmax, blocksize, list(shape), lora_a, lora_b, scale
    )


@torch.library.register_fake("lorakit::lora_merge_")
def _lora_merge_fake(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> None:
    check.float_tensor("lora_merge_", weight, "weight")
    torch._check(weight.dim() == 2, lambda: "lora_merge_: weight must be 2-D (out, in)")
    check.lora_merge("lora_merge_", weight.shape[0], weight.shape[1], weight.device, lora_a, lora_b)


@torch.library.register_fake("lorakit::nf4_lora_merge")
def _nf4_lora_merge_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "nf4_lora_merge"
    torch._check(len(shape) == 2, lambda: f"{op}: shape must be (out, in), got {shape}")
    check.nf4_dequantize(op, packed, absmax, blocksize, shape, torch.float32)
    check.lora_merge(op, shape[0], shape[1], packed.device, lora_a, lora_b)
    return packed.new_empty((packed.numel(),)), absmax.new_empty((absmax.numel(),))
