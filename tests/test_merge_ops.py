"""lora_merge_ and nf4_lora_merge against plain-PyTorch references (and bitsandbytes for NF4)."""

import bitsandbytes.functional as bnbf
import pytest
import torch

import nf4_reference as ref
from conftest import FLOAT_DTYPES
from lorakit import ops


def reference_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return (w.float() + s * (b.float() @ a.float())).to(w.dtype)


def ulps_apart(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place (same-sign floats map monotonically to integers)."""
    width = {4: torch.int32, 2: torch.int16}[x.element_size()]
    return (x.view(width).long() - y.view(width).long()).abs()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("out", "inp", "r"), [(48, 80, 8), (7, 33, 1), (64, 64, 64)])
def test_merge_matches_the_float32_reference(dtype, out, inp, r):
    w = torch.randn(out, inp).to(dtype)
    a, b = torch.randn(r, inp).to(dtype), torch.randn(out, r).to(dtype)
    expected = reference_merge(w, a, b, 0.7)
    magnitude = w.float().abs() + 0.7 * (b.float().abs() @ a.float().abs())
    ops.lora_merge_(w, a, b, 0.7)
    if dtype == torch.float32:
        # Float32 sums of r products in two orders differ by at most ~r ulps of the sum of the
        # terms' magnitudes (elements that cancel have no meaningful relative error).
        eps = torch.finfo(torch.float32).eps
        assert ((w - expected).abs() <= (r + 2) * eps * magnitude).all()
    else:
        # Those float32 differences move the final rounding to 16 bits by one ulp at most, rarely.
        away = ulps_apart(w, expected)
        assert away.max() <= 1 and (away > 0).float().mean() < 0.05


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unmerge_restores_the_weight_within_one_rounding(dtype):
    w = torch.randn(96, 64).to(dtype)
    original = w.clone()
    a, b = torch.randn(8, 64).to(dtype) / 8, torch.randn(96, 8).to(dtype) / 8
    ops.lora_merge_(w, a, b, 2.0)
    assert not torch.equal(w, original)
    ops.lora_merge_(w, a, b, -2.0)
    # Two roundings to the dtype: each moves a value by at most half an ulp of the larger of
    # |w| and |w + delta| (|delta| ~ 0.25 < |w| typically), so one ulp of |w| + |delta| bounds it.
    eps = torch.finfo(dtype).eps
    bound = eps * (original.float().abs() + (b.float() @ a.float()).abs() * 2.0 + 1e-3)
    assert ((w.float() - original.float()).abs() <= bound).all()


def nf4_reference_merge(packed, absmax, blocksize, shape, a, b, s):
    w = ref.nf4_dequantize(packed, absmax, blocksize, shape, torch.float32)
    return ref.nf4_quantize(w + s * (b.float() @ a.float()), blocksize)


@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize(("out", "inp"), [(32, 128), (9, 45)])  # blocks spanning rows, odd numel
def test_nf4_merge_matches_the_reference_and_bitsandbytes(blocksize, out, inp):
    weight = torch.randn(out, inp)
    packed, absmax = ops.nf4_quantize(weight, blocksize)
    a, b = torch.randn(4, inp) / 4, torch.randn(out, 4) / 4
    got_packed, got_absmax = ops.nf4_lora_merge(packed, absmax, blocksize, (out, inp), a, b, 1.5)
    want_packed, want_absmax = nf4_reference_merge(packed, absmax, blocksize, [out, inp], a, b, 1.5)
    # float32 sums in another order may land a value on the other side of a code midpoint now
    # and then (or move an absmax by an ulp); everything else is byte for byte.
    torch.testing.assert_close(got_absmax, want_absmax, rtol=1e-6, atol=0)
    assert (got_packed != want_packed).float().mean() < 0.01
    # bitsandbytes quantizing the same merged float32 weight gives the same bytes.
    merged = ops.nf4_dequantize(packed, absmax, blocksize, (out, inp), torch.float32)
    merged += 1.5 * (b @ a)
    bnb_packed, state = bnbf.quantize_4bit(merged, blocksize=blocksize, quant_type="nf4")
    assert (got_packed != bnb_packed.view(-1)).float().mean() < 0.01
    torch.testing.assert_close(got_absmax, state.absmax, rtol=1e-6, atol=0)


def test_opcheck():
    w, a, b = torch.randn(16, 32), torch.randn(4, 32), torch.randn(16, 4)
    torch.library.opcheck(torch.ops.lorakit.lora_merge_, (w, a, b, 0.5))
    packed, absmax = ops.nf4_quantize(w, 64)
    args = (packed, absmax, 64, [16, 32], a, b, 0.5)
    torch.library.opcheck(torch.ops.lorakit.nf4_lora_merge, args)


def test_torch_compile_fullgraph():
    w, a, b = torch.randn(16, 32), torch.randn(4, 32), torch.randn(16, 4)
    expected = reference_merge(w, a, b, 0.5)
    packed, absmax = ops.nf4_quantize(w, 64)

    def merge_both(w, packed, absmax):
        ops.lora_merge_(w, a, b, 0.5)
        return ops.nf4_lora_merge(packed, absmax, 64, (16, 32), a, b, 0.5)

    compiled = torch.compile(merge_both, fullgraph=True, backend="aot_eager")
    got_packed, _ = compiled(w, packed, absmax)
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_packed, ops.nf4_lora_merge(packed, absmax, 64, (16, 32), a, b, 0.5)[0])


def test_bad_input_is_a_clear_error():
    w = torch.randn(16, 32)
    with pytest.raises(RuntimeError, match=r"do not fit a weight of shape \[16, 32\]"):
        ops.lora_merge_(w, torch.randn(4, 31), torch.randn(16, 4), 1.0)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        ops.lora_merge_(w.t(), torch.randn(4, 16), torch.randn(32, 4), 1.0)
    with pytest.raises(RuntimeError, match="weight must be float32, float16 or bfloat16"):
        ops.lora_merge_(w.double(), torch.randn(4, 32), torch.randn(16, 4), 1.0)
    packed, absmax = ops.nf4_quantize(w, 64)
    with pytest.raises(RuntimeError, match=r"shape must be \(out, in\)"):
        ops.nf4_lora_merge(packed, absmax, 64, (512,), torch.randn(4, 32), torch.randn(16, 4), 1.0)
    with pytest.raises(RuntimeError, match="packed has 256 bytes but shape"):
        ops.nf4_lora_merge(packed, absmax, 64, (16, 64), torch.randn(4, 64), torch.randn(16, 4), 1)
