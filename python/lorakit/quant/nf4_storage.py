"""An NF4 weight as two plain ``uint8`` tensors with one row per quantization block, the form in
which :class:`~lorakit.nn.NF4Linear` registers it as frozen parameters, so that FSDP2 shards it.

Why plain byte tensors and not a ``torch.Tensor`` subclass (torchao's ``NF4Tensor``): FSDP2
(torch 2.14, ``torch.distributed.fsdp.fully_shard``) already shards and all-gathers parameters of
any dtype, frozen ones included. It chunks each parameter along dim 0, skips mixed-precision casts
for non-float dtypes, and all-gathers a layer's parameters of mixed dtypes as one byte buffer.
With one row per block, a chunk along dim 0 holds whole blocks, so no shard boundary ever splits a
block or separates a block's codes from its scale, and after the all-gather the rows are
contiguous: the packed codes and the scales the native kernels take are views of the gathered
parameters, with no copy and no unpacking. A subclass would have to implement every aten op that
FSDP2, ``nn.Module.to``, ``state_dict`` and ``torch.distributed.checkpoint`` apply to it (``chunk``,
``split``, ``new_zeros``, ``copy_``, ``view``, ``as_strided``, ``detach``, ``to``, ...) plus the
``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` pair, and keep them right across torch versions,
for the same result. bitsandbytes stores its 4-bit data in a float dtype (``quant_storage``)
because FSDP1 flattens a module's parameters into one buffer of one dtype; FSDP2 has no such
need, so the codes stay ``uint8``.

Rows:

- ``codes``: ``uint8 (blocks, blocksize // 2)``, the packed codes; the last row is zero-padded
  when the weight is not a whole number of blocks.
- ``scales``: ``uint8 (blocks, 1)``, the 8-bit double-quantized scale of each block, or
  ``uint8 (blocks, 4)``, the bytes of its float32 scale. Bytes rather than float32, so that
  ``model.to(torch.bfloat16)`` (which casts floating parameters) leaves them alone.

Double quantization's second level (one float32 per 256 blocks, its 256-entry code and the offset,
about 0.008 bits per weight) is not sharded: every rank keeps it whole.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lorakit.quant.nf4 import NF4Weight, QuantizedAbsmax


def block_rows(weight: NF4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``weight`` as described in the module docstring (fresh tensors)."""
    blocks = -(-math.prod(weight.shape) // weight.blocksize)
    row = weight.blocksize // 2
    codes = weight.packed.new_zeros(blocks * row)
    codes[: weight.packed.numel()] = weight.packed
    absmax = weight.absmax
    if isinstance(absmax, QuantizedAbsmax):
        scales = absmax.q.clone()
    else:
        scales = absmax.to(torch.float32).contiguous().view(torch.uint8)
    return codes.view(blocks, row), scales.view(blocks, -1)


def nested_part(weight: NF4Weight) -> QuantizedAbsmax | None:
    """The unsharded second level of ``weight``'s double-quantized scales (an empty ``q``), or
    None when its scales are float32."""
    absmax = weight.absmax
    if not isinstance(absmax, QuantizedAbsmax):
        return None
    return replace(absmax, q=absmax.q.new_empty(0))


def from_block_rows(
    codes: torch.Tensor,
    scales: torch.Tensor,
    nested: QuantizedAbsmax | None,
    shape: torch.Size,
    dtype: torch.dtype,
    blocksize: int,
) -> NF4Weight:
    """The :class:`NF4Weight` whose rows :func:`block_rows` made; its tensors are views of
    ``codes`` and ``scales`` (contiguous, as an all-gather leaves them)."""
    packed = codes.reshape(-1)[: -(-math.prod(shape) // 2)]
    flat = scales.reshape(-1)
    absmax = flat.view(torch.float32) if nested is None else replace(nested, q=flat)
    return NF4Weight(packed=packed, absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize)
