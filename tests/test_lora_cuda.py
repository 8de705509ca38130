"""The CUDA LoRA linear against the same composition in float64 (run on a GPU only): the decode
kernel (1-16 rows), the dequantize + cuBLAS path, and the backward."""

import pytest
import torch

import lora_reference as ref
from conftest import FLOAT_DTYPES
from lorakit import ops
from lorakit.quant import QuantizedAbsmax

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tokens", [1, 4, 16, 17, 300])
@pytest.mark.parametrize("base", ["dense", "nf4", "nf4 double-quantized"])
def test_matches_float64_reference(dtype, tokens, base):
    n_in, n_out = 512, 384
    x = torch.randn(tokens, n_in, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(n_out, n_in, device="cuda") / n_in**0.5).to(dtype)
    bias = torch.randn(n_out, device="cuda").to(dtype)
    a = (torch.randn(8, n_in, device="cuda") / n_in**0.5).to(dtype).requires_grad_()
    b = torch.randn(n_out, 8, device="cuda").to(dtype).requires_grad_()
    if base == "nf4":
        packed, absmax = ops.nf4_quantize(w, 64)
        w = ops.nf4_dequantize(packed, absmax, 64, w.shape, dtype)
        y = ops.lora_linear_nf4(x, packed, absmax, 64, bias, a, b, 2.0)
    elif base == "nf4 double-quantized":
        packed, absmax = ops.nf4_quantize(w, 64)
        nested = QuantizedAbsmax.from_scales(absmax)
        w = ops.nf4_dequantize(packed, nested.dequantize(), 64, w.shape, dtype)
        args = (nested.q, 64, bias, a, b, 2.0, None, nested.absmax, nested.code, nested.offset)
        y = ops.lora_linear_nf4(x, packed, *args)
    else:
        y = ops.lora_linear(x, w, bias, a, b, 2.0)
    grad = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, (x, a, b), grad)]
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    y64 = ref.lora_linear(leaves[0], w.double(), bias.double(), leaves[1], leaves[2], 2.0)
    exact = [y64, *torch.autograd.grad(y64, leaves, grad.double())]
    leaves = [t.detach().requires_grad_() for t in (x, a, b)]
    y_low = ref.lora_linear(leaves[0], w, bias, leaves[1], leaves[2], 2.0)
    low = [y_low, *torch.autograd.grad(y_low, leaves, grad)]
    # As in test_lora_ops.py: at most twice plain PyTorch's error in the same dtype, plus one
    # rounding of the dtype (at least 1e-5 for float32, whose cuBLAS may use TF32 off or on).
    floor = max(torch.finfo(dtype).eps, 1e-5)
    for o, lo, ex in zip(got, low, exact, strict=True):
        bound = 2 * (lo.double() - ex).abs().max() + floor * ex.abs().max()
        assert (o.double() - ex).abs().max() <= bound
