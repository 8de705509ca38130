"""Layout of lorakit AdamW's per-parameter state: creating it and checking a loaded one.

32-bit state: ``exp_avg`` and ``exp_avg_sq``, float32 of the parameter's shape.
8-bit state: ``exp_avg`` and ``exp_avg_sq``, uint8 codes of the parameter's shape, plus
``exp_avg_absmax`` and ``exp_avg_sq_absmax``, float32 ``(ceil(numel / 256),)``.
Both also hold ``step``, the number of steps taken (an int).

Under FSDP2 a parameter is a ``DTensor`` and each rank keeps the state of its own shard only:
moments shaped like the local shard, and 8-bit blocks of 256 counted from the shard's first
element, so a block never straddles two ranks (each rank quantizes what it holds; no block needs
values from another). Whether a parameter keeps 8-bit state is decided on its whole size, so it is
the same on any number of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lorakit.ops import ADAMW8BIT_BLOCKSIZE

# Tensors smaller than this keep 32-bit state in an 8-bit optimizer: their state is a rounding
# error of the total, and quantizing it would only cost accuracy (bitsandbytes' min_8bit_size).
MIN_8BIT_NUMEL = 4096

MOMENTS = ("exp_avg", "exp_avg_sq")  # shaped like the parameter; absmax tensors are flat
KEYS_32BIT = frozenset({"step", *MOMENTS})
KEYS_8BIT = KEYS_32BIT | {"exp_avg_absmax", "exp_avg_sq_absmax"}


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view of it, updated in place by the step), or
    ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def uses_8bit(param: torch.Tensor, state_bits: int) -> bool:
    """Whether ``param`` keeps 8-bit state in a group with ``state_bits`` (on its whole size, a
    ``DTensor``'s global one)."""
    return state_bits == 8 and param.numel() >= MIN_8BIT_NUMEL


def state_layout(n: int, eightbit: bool) -> dict[str, tuple[torch.dtype, int]]:
    """Dtype and number of elements of each state tensor of an ``n``-element parameter."""
    blocks = (n + ADAMW8BIT_BLOCKSIZE - 1) // ADAMW8BIT_BLOCKSIZE
    if eightbit:
        return {
            "exp_avg": (torch.uint8, n),
            "exp_avg_sq": (torch.uint8, n),
            "exp_avg_absmax": (torch.float32, blocks),
            "exp_avg_sq_absmax": (torch.float32, blocks),
        }
    return {"exp_avg": (torch.float32, n), "exp_avg_sq": (torch.float32, n)}


def state_bytes(n: int, eightbit: bool) -> int:
    """Bytes of optimizer state that an ``n``-element parameter needs."""
    return sum(dtype.itemsize * count for dtype, count in state_layout(n, eightbit).values())


def new_state(
    param: torch.Tensor, eightbit: bool, device: torch.device, pin_memory: bool = False
) -> dict[str, Any]:
    """Zero moments for ``param`` on ``device`` (pinned host memory for paged state). Zero 8-bit
    codes are index 0 / absmax 0 blocks, which dequantize to exactly 0 as the codes nearest 0 are
    scaled by 0. A ``DTensor`` ``param`` gets the state of its local shard."""
    shard = local_shard(param)
    state: dict[str, Any] = {"step": 0}
    for key, (dtype, numel) in state_layout(shard.numel(), eightbit).items():
        shape = shard.shape if key in MOMENTS else (numel,)
        state[key] = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
    return state


def check_loaded_state(index: int, param: torch.Tensor, state: dict[str, Any], bits: int) -> None:
    """Raises ValueError unless ``state`` is what this optimizer keeps for ``param``."""
    eightbit = uses_8bit(param, bits)
    keys = KEYS_8BIT if eightbit else KEYS_32BIT
    kind = "8-bit" if eightbit else "32-bit"
    if set(state) != keys:
        raise ValueError(
            f"optimizer state of parameter {index} has keys {sorted(state)}, but this optimizer "
            f"keeps {kind} state for it ({sorted(keys)}): the state dict comes from another "
            "optimizer configuration (state_bits, or another optimizer)"
        )
    for key, (dtype, numel) in state_layout(local_shard(param).numel(), eightbit).items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.numel() != numel:
            got = (
                f"{value.dtype} with {value.numel()} elements" if torch.is_tensor(value) else value
            )
            raise ValueError(
                f"optimizer state {key!r} of parameter {index} should be {dtype} with {numel} "
                f"elements ({kind} state), got {got}"
            )
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"optimizer state 'step' of parameter {index} must be an int >= 0")
