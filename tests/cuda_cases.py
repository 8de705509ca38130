"""Inputs of the CUDA kernel tests, shared by the GPU tests (test_cuda_ops.py) and the CPU
emulation of the same kernels (emulation/run_emulated.py)."""

import torch

from lorakit import ops
from lorakit.quant import nf4_code

NF4_BLOCKSIZES = list(ops.NF4_BLOCKSIZES)
BLOCKWISE8_BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]
# Empty, one value, odd counts, partial last blocks, a tail shorter than a thread's share.
SIZES = [0, 1, 7, 1000, 4097, 2**20 + 3]


def special_values(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values with zeros, signed zeros, subnormals, ±Inf and NaN sprinkled in; for large
    n the first 4096 values are zeros, so whole blocks are zero at every blocksize."""
    w = torch.randn(n) * 3
    specials = torch.tensor([0.0, -0.0, 1e-39, -1e-40, float("inf"), -float("inf"), float("nan")])
    zeros = 4096 if n >= 3 * 4096 else 0
    idx = torch.randint(zeros, n, (40,))
    w[idx] = specials[torch.arange(idx.numel()) % specials.numel()]
    w[:zeros] = 0.0
    return w.to(dtype)


def midpoint_neighbours() -> torch.Tensor:
    """Float32 values on, and 1 or 2 ulps either side of, every NF4 bucket boundary, and the
    codes themselves."""
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2.0  # the float32 midpoints the kernels compare against
    values = [mids, code]
    for direction in (float("inf"), -float("inf")):
        step = mids
        for _ in range(2):
            step = torch.nextafter(step, torch.full_like(step, direction))
            values.append(step)
    return torch.cat(values)


def scaled_midpoint_blocks(code: torch.Tensor, absmax: float, signed: bool = True) -> torch.Tensor:
    """Blocks of 256 float32 values whose absolute maximum is ``absmax`` (each block's first
    value) and whose other values lie within 3 ulps of ``absmax`` x every midpoint of ``code``
    (their magnitudes, unless ``signed``): where scaling by ``1 / absmax`` (rounded once) and
    dividing by ``absmax`` pick different codes, so a kernel that divides fails on them."""
    midpoints = (code[:-1] + code[1:]) / 2
    centres = (midpoints * absmax).view(torch.int32)
    offsets = torch.arange(-3, 4, dtype=torch.int32)
    values = (centres[:, None] + offsets).reshape(-1).view(torch.float32)
    values = values[values.abs() < absmax]
    values = torch.cat([values, torch.zeros((-values.numel()) % 255)]).reshape(-1, 255)
    blocks = torch.cat([torch.full((values.shape[0], 1), absmax), values], dim=1).reshape(-1)
    return blocks if signed else blocks.abs()
