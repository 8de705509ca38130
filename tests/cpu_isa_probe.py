"""Runs every CPU kernel that has a copy per instruction-set level on fixed inputs and saves the
results (``python tests/cpu_isa_probe.py OUT``); tests/test_cpu_isa.py runs it once per level
(LORAKIT_CPU_ISA) and compares the levels."""

from __future__ import annotations

import sys

import torch

from lorakit import ops
from lorakit._native import cpu_isa
from lorakit.quant import dynamic_map

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _nf4(results: dict[str, torch.Tensor], g: torch.Generator) -> None:
    # 130 rows of 192: full blocks for the vector paths and, at blocksize 128, a partial last one.
    w = torch.randn(130, 192, generator=g)
    for blocksize in (32, 64, 128):
        packed, absmax = ops.nf4_quantize(w, blocksize)
        for dtype in DTYPES:
            out = ops.nf4_dequantize(packed, absmax, blocksize, w.shape, dtype)
            results[f"nf4_dequantize/{blocksize}/{dtype}"] = out


def _decode(results: dict[str, torch.Tensor], g: torch.Generator) -> None:
    out_features, in_features, rank = 96, 256, 8
    w = torch.randn(out_features, in_features, generator=g) / 16
    packed, absmax = ops.nf4_quantize(w, 64)
    a = torch.randn(rank, in_features, generator=g) / 16
    b = torch.randn(out_features, rank, generator=g) / 16
    bias = torch.randn(out_features, generator=g)
    for tokens in (1, 2, 3, 5, 8, 13, 16, 17):  # every row pass of the decode kernels, and past it
        x = torch.randn(tokens, in_features, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            y = ops.lora_linear_nf4(
                x.to(dtype), packed, absmax, 64, bias.to(dtype), a.to(dtype), b.to(dtype), 0.5
            )
            results[f"lora_linear_nf4/{tokens}/{dtype}"] = y


def _adamw(results: dict[str, torch.Tensor], g: torch.Generator) -> None:
    n = 3 * 256 + 77  # full blocks and a partial one
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, grad_scale=0.7)
    codes = (dynamic_map(True, torch.device("cpu")), dynamic_map(False, torch.device("cpu")))
    for dtype in DTYPES:
        p32 = torch.randn(n, generator=g).to(dtype)
        p8 = p32.clone()
        m, v = torch.zeros(n), torch.zeros(n)
        blocks = (n + 255) // 256
        qm, qv = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        am, av = torch.zeros(blocks), torch.zeros(blocks)
        for step in (1, 2, 3):
            grad = torch.randn(n, generator=g).to(dtype)
            ops.adamw_step_(p32, grad, m, v, step=step, **hyper)
            ops.adamw8bit_step_(p8, grad, qm, am, qv, av, *codes, step=step, **hyper)
        results[f"adamw/{dtype}"] = torch.cat([p32.float(), m, v])
        results[f"adamw8bit/{dtype}"] = torch.cat([p8.float(), qm.float(), qv.float(), am, av])


def _fused_ce(results: dict[str, torch.Tensor], g: torch.Generator) -> None:
    hidden = torch.randn(37, 48, generator=g)
    weight = torch.randn(1003, 48, generator=g) / 4  # a vocabulary no lane count divides
    labels = torch.randint(0, 1003, (37,), generator=g)
    labels[5] = -100
    for dtype in DTYPES:
        h = hidden.to(dtype).clone().requires_grad_()  # a leaf of its own per dtype
        loss = ops.fused_linear_cross_entropy(h, weight.to(dtype), labels)
        loss.backward()
        results[f"fused_ce/{dtype}"] = torch.cat([loss.float()[None], h.grad.float().flatten()])


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    results: dict[str, torch.Tensor] = {}
    for probe in (_nf4, _decode, _adamw, _fused_ce):
        probe(results, g)
    results["level"] = torch.tensor([ord(c) for c in cpu_isa()])
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
