"""Plain-PyTorch references of the AdamW steps, one elementwise op at a time in the kernels'
order, so that each float32 rounding happens where the kernel rounds."""

from __future__ import annotations

import math

import torch

import nf4_reference as ref

BLOCKSIZE = 256


def _moments_and_param(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 AdamW on flat float32 tensors; returns the new (param, m, v)."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  (one host rounding)
    lr, step = hyper["lr"], int(hyper["step"])
    bc1 = 1.0 - hyper["beta1"] ** step
    bc2 = 1.0 - hyper["beta2"] ** step
    g = g * f32(hyper.get("grad_scale", 1.0))
    m = m + f32(1.0 - hyper["beta1"]) * (g - m)
    v = v * f32(hyper["beta2"]) + (f32(1.0 - hyper["beta2"]) * g) * g
    # torch's CPU float32 sqrt is not always correctly rounded (off by an ulp); the kernels use
    # the IEEE sqrt, which sqrt in float64 rounded once to float32 reproduces exactly.
    sqrt_v = v.double().sqrt().float()
    denom = sqrt_v / f32(math.sqrt(bc2)) + f32(hyper["eps"])
    p = p * f32(1.0 - lr * hyper["weight_decay"])
    p = p + (f32(-(lr / bc1)) * m) / denom
    return p, m, v


def adamw_step_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, **hyper: float
) -> None:
    new_p, new_m, new_v = _moments_and_param(p.float(), g.float(), m, v, hyper)
    p.copy_(new_p)
    m.copy_(new_m)
    v.copy_(new_v)


def adamw8bit_step_(
    p: torch.Tensor,
    g: torch.Tensor,
    qm: torch.Tensor,
    am: torch.Tensor,
    qv: torch.Tensor,
    av: torch.Tensor,
    code_m: torch.Tensor,
    code_v: torch.Tensor,
    **hyper: float,
) -> None:
    m = ref.blockwise8_dequantize(qm, am, code_m, BLOCKSIZE, torch.float32)
    v = ref.blockwise8_dequantize(qv, av, code_v, BLOCKSIZE, torch.float32)
    new_p, new_m, new_v = _moments_and_param(p.float(), g.float(), m, v, hyper)
    p.copy_(new_p)
    for q, absmax, x, code in ((qm, am, new_m, code_m), (qv, av, new_v, code_v)):
        new_q, new_absmax = ref.blockwise8_quantize(x, code, BLOCKSIZE)
        q.copy_(new_q)
        absmax.copy_(new_absmax)
