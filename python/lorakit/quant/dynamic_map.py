"""bitsandbytes' dynamic 8-bit quantization map (Dettmers 2015, "8-Bit Approximations for
Parallelism in Deep Learning"), used for double quantization and for 8-bit optimizer state."""

from __future__ import annotations

import functools

import torch

_EXPONENT_LEVELS = 7  # scales 1e-6 ... 1 for 8-bit codes


@functools.cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # Level k covers magnitudes [0.1, 1] * 10**(k - 6) with 2**k (signed) or 2**(k+1) (unsigned)
    # evenly spaced bucket centres; 0 and 1 complete the 256 codes. Computed in float32 in the
    # same order as bitsandbytes so the values agree to the bit.
    values: list[torch.Tensor] = [torch.tensor([0.0, 1.0])]
    for level in range(_EXPONENT_LEVELS):
        count = 2 ** (level if signed else level + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (level - (_EXPONENT_LEVELS - 1))
        values.append(scale * centres)
        if signed:
            values.append(-scale * centres)
    code = torch.cat(values).sort().values
    assert code.numel() == 256
    return code


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """Returns the 256 sorted float32 codes of the dynamic 8-bit map (a fresh copy).

    Args:
        signed: codes in [-1, 1] (True) or [0, 1] (False, for non-negative values such as
            Adam's second moment).
        device: where to put the result.
    """
    return _dynamic_map_cpu(signed).to(device, copy=True)
