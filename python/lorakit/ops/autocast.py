"""Autocast rules for the LoRA ops, so that they run inside ``torch.autocast`` as ``F.linear`` does.

Inside an autocast region the activations, a dense base weight, the bias and the adapter factors
are cast to the autocast dtype before the op runs; float32 adapter weights thereby keep float32
gradients (the cast's backward converts them back), the mixed precision PEFT users know. NF4
codes and their scales are left as stored: the scales are float32 by design, and casting them
would change the dequantized weight. Outside autocast nothing changes: mixed dtypes are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import lorakit._native  # noqa: F401  (defines torch.ops.lorakit)

# Argument positions that autocast casts, per op (see the schemas in csrc/ops.cpp).
_CAST_POSITIONS = {
    "lora_linear": (0, 1, 2, 3, 4, 6),  # x, weight, bias, lora_a, lora_b, x_lora
    "lora_linear_nf4": (0, 4, 5, 6, 8),  # x, bias, lora_a, lora_b, x_lora
}
_DEVICES = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}

_LIB = torch.library.Library("lorakit", "IMPL")


def _autocast_kernel(
    op: torch._ops.OpOverload, positions: tuple[int, ...], device_type: str, key: str
) -> Callable[..., object]:
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(*args: object) -> object:
        dtype = torch.get_autocast_dtype(device_type)
        cast = [
            arg.to(dtype)
            if index in positions
            and isinstance(arg, torch.Tensor)
            and arg.is_floating_point()
            and arg.device.type == device_type
            else arg
            for index, arg in enumerate(args)
        ]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast)

    return kernel


for _name, _positions in _CAST_POSITIONS.items():
    _op = getattr(torch.ops.lorakit, _name).default
    for _device, _key in _DEVICES.items():
        _LIB.impl(_name, _autocast_kernel(_op, _positions, _device, _key), _key)
