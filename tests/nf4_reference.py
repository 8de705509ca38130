"""Plain-PyTorch references for the quantization ops, written for readability, not speed."""

from __future__ import annotations

import torch

# The NF4 code values from the QLoRA paper (appendix E), float32.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


def nf4_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = w.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    code = NF4_CODE.to(x.device)
    midpoints = (code[:-1] + code[1:]) / 2
    # Full blocks are multiplied by the reciprocal of their absmax (clamped so that a zero block
    # scales to 0, not NaN); a last partial block is divided by its clamped absmax, which is also
    # what gets stored. bucketize (right=False) sends a value on a midpoint to the lower code.
    blocks = x[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        tail_absmax = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, x[full:] / tail_absmax])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # a scaled zero pads the last byte
    codes = torch.bucketize(scaled, midpoints)
    return (codes[0::2] << 4 | codes[1::2]).to(torch.uint8), absmax


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: list[int], dtype: torch.dtype
) -> torch.Tensor:
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()
    n = int(torch.tensor(shape).prod()) if shape else 1
    values = NF4_CODE.to(packed.device)[codes[:n]]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)


def blockwise8_quantize(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1).float()
    blocks = [b for b in flat.split(blocksize) if b.numel()]
    absmax = torch.stack([b.abs().max() for b in blocks]) if blocks else torch.zeros(0)
    # bitsandbytes' rule: multiply by 1 / absmax rounded once to float32 (not a division).
    inverse = absmax.clamp(min=1e-38).reciprocal().repeat_interleave(blocksize)[: flat.numel()]
    midpoints = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(flat * inverse, midpoints).to(torch.uint8)
    return q.reshape(x.shape), absmax


def blockwise8_dequantize(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    scale = absmax.repeat_interleave(blocksize)[: q.numel()]
    return (code[q.reshape(-1).long()] * scale).to(dtype).reshape(q.shape)
