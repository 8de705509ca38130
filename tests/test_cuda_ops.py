"""CUDA kernels against the CPU kernels, bit for bit (the CPU ones are checked against
bitsandbytes in test_nf4_ops.py and test_blockwise8_ops.py)."""

import pytest
import torch

from conftest import FLOAT_DTYPES, bits
from cuda_cases import (
    BLOCKWISE8_BLOCKSIZES,
    NF4_BLOCKSIZES,
    SIZES,
    midpoint_neighbours,
    scaled_midpoint_blocks,
    special_values,
)
from lorakit import ops
from lorakit.quant import dynamic_map

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype, shape and bits, except NaN payloads: a NaN must be NaN on both sides, but
    CPU and GPU arithmetic and conversions produce different NaN bit patterns."""
    assert actual.device.type == "cuda"
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if not actual.is_floating_point():
        assert torch.equal(actual, expected)
        return
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    assert torch.equal(bits(actual.masked_fill(nan, 0)), bits(expected.masked_fill(nan, 0)))


# ---- NF4 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", NF4_BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_nf4_matches_cpu(dtype: torch.dtype, blocksize: int, n: int) -> None:
    w = special_values(n, dtype) if n > 100 else (torch.randn(n) * 3).to(dtype)
    packed, absmax = ops.nf4_quantize(w, blocksize)
    packed_gpu, absmax_gpu = ops.nf4_quantize(w.cuda(), blocksize)
    assert_same(packed_gpu, packed)
    assert_same(absmax_gpu, absmax)
    # Dequantize the CPU's bytes on both devices.
    out = ops.nf4_dequantize(packed, absmax, blocksize, w.shape, dtype)
    out_gpu = ops.nf4_dequantize(packed.cuda(), absmax.cuda(), blocksize, w.shape, dtype)
    assert_same(out_gpu, out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_nf4_dequantize_matches_cpu_on_arbitrary_bytes(dtype: torch.dtype, blocksize: int) -> None:
    # Every byte value, and scales that are negative, zero, subnormal, huge, Inf and NaN.
    n = 3 * 4096 * 2 + 5
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
    absmax = torch.randn((n + blocksize - 1) // blocksize) * 100
    specials = torch.tensor([0.0, -1.0, 1e-40, 3e38, float("inf"), float("nan")])
    absmax[: specials.numel()] = specials[: absmax.numel()]
    shape = (n,)
    out = ops.nf4_dequantize(packed, absmax, blocksize, shape, dtype)
    out_gpu = ops.nf4_dequantize(packed.cuda(), absmax.cuda(), blocksize, shape, dtype)
    assert_same(out_gpu, out)


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("blocksize", [32, 256, 1024])
def test_nf4_quantize_at_bucket_boundaries(blocksize: int, partial: bool) -> None:
    # Full blocks multiply by 1/absmax, a last partial block divides by absmax; with absmax 1
    # both give x, so these values land exactly on, and just beside, every bucket boundary.
    values = midpoint_neighbours()
    reps = -(-values.numel() // (blocksize - 1))
    w = torch.cat([torch.cat([torch.ones(1), chunk]) for chunk in values.split(blocksize - 1)])
    w = torch.cat([w, torch.zeros(reps * blocksize - w.numel())])
    if partial:
        w = w[: w.numel() - 3]
    packed, absmax = ops.nf4_quantize(w, blocksize)
    packed_gpu, absmax_gpu = ops.nf4_quantize(w.cuda(), blocksize)
    assert_same(packed_gpu, packed)
    assert_same(absmax_gpu, absmax)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nf4_non_contiguous_input(dtype: torch.dtype) -> None:
    w = (torch.randn(96, 130) * 2).to(dtype).t()
    assert not w.is_contiguous()
    packed, absmax = ops.nf4_quantize(w, 64)
    packed_gpu, absmax_gpu = ops.nf4_quantize(w.cuda(), 64)
    assert_same(packed_gpu, packed)
    assert_same(absmax_gpu, absmax)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("offset", [1, 3])
def test_nf4_misaligned_storage_offset(dtype: torch.dtype, offset: int) -> None:
    # A storage offset leaves the data pointer off 16-byte (input) and 8-byte (packed) alignment,
    # which sends the kernels down their scalar paths.
    n = 64 * 1000 + 17
    base = (torch.randn(n + offset) * 2).to(dtype)
    w = base[offset:]
    packed, absmax = ops.nf4_quantize(w, 64)
    packed_gpu, absmax_gpu = ops.nf4_quantize(base.cuda()[offset:], 64)
    assert_same(packed_gpu, packed)
    assert_same(absmax_gpu, absmax)
    packed_base = torch.cat([torch.zeros(offset, dtype=torch.uint8), packed]).cuda()
    absmax_base = torch.cat([torch.zeros(offset), absmax]).cuda()
    out_gpu = ops.nf4_dequantize(packed_base[offset:], absmax_base[offset:], 64, (n,), dtype)
    assert_same(out_gpu, ops.nf4_dequantize(packed, absmax, 64, (n,), dtype))


def test_nf4_empty_and_shapes() -> None:
    packed, absmax = ops.nf4_quantize(torch.empty(0, 5, device="cuda"), 64)
    assert packed.shape == (0,) and absmax.shape == (0,)
    assert packed.is_cuda and absmax.is_cuda
    out = ops.nf4_dequantize(packed, absmax, 64, (0, 5), torch.bfloat16)
    assert out.shape == (0, 5) and out.dtype == torch.bfloat16 and out.is_cuda
    w = torch.randn(3, 5, 7, device="cuda")
    packed, absmax = ops.nf4_quantize(w, 32)
    out = ops.nf4_dequantize(packed, absmax, 32, w.shape, torch.float16)
    assert out.shape == w.shape and out.dtype == torch.float16


def test_nf4_opcheck() -> None:
    w = torch.randn(37, 65, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.lorakit.nf4_quantize, (w, 64))
    packed, absmax = ops.nf4_quantize(w, 64)
    args = (packed, absmax, 64, list(w.shape), torch.bfloat16)
    torch.library.opcheck(torch.ops.lorakit.nf4_dequantize, args)


def test_nf4_mixed_devices_are_an_error() -> None:
    packed, absmax = ops.nf4_quantize(torch.randn(128), 64)
    with pytest.raises(RuntimeError, match="same device"):
        ops.nf4_dequantize(packed.cuda(), absmax, 64, (128,), torch.float32)


# ---- blockwise 8-bit -------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKWISE8_BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_blockwise8_matches_cpu(signed: bool, dtype: torch.dtype, blocksize: int, n: int) -> None:
    x = special_values(n, dtype) if n > 100 else torch.randn(n).to(dtype)
    if not signed:
        x = x.abs()
    code = dynamic_map(signed)
    q, absmax = ops.blockwise8_quantize(x, code, blocksize)
    q_gpu, absmax_gpu = ops.blockwise8_quantize(x.cuda(), code.cuda(), blocksize)
    assert_same(q_gpu, q)
    assert_same(absmax_gpu, absmax)
    out = ops.blockwise8_dequantize(q, absmax, code, blocksize, dtype)
    out_gpu = ops.blockwise8_dequantize(q.cuda(), absmax.cuda(), code.cuda(), blocksize, dtype)
    assert_same(out_gpu, out)


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise8_scales_by_the_reciprocal_as_the_cpu(signed: bool) -> None:
    # Values where scaling by 1 / absmax and dividing by absmax pick different codes.
    code = dynamic_map(signed)
    x = scaled_midpoint_blocks(code, 3.7, signed)
    q, absmax = ops.blockwise8_quantize(x, code, 256)
    q_gpu, absmax_gpu = ops.blockwise8_quantize(x.cuda(), code.cuda(), 256)
    assert_same(q_gpu, q)
    assert_same(absmax_gpu, absmax)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_blockwise8_dequantize_matches_cpu_on_arbitrary_bytes(dtype: torch.dtype) -> None:
    n = 256 * 300 + 11
    q = torch.randint(0, 256, (n,), dtype=torch.uint8)
    absmax = torch.randn((n + 255) // 256) * 10
    absmax[:5] = torch.tensor([0.0, -2.0, 1e-40, float("inf"), float("nan")])
    code = dynamic_map(True)
    out = ops.blockwise8_dequantize(q, absmax, code, 256, dtype)
    out_gpu = ops.blockwise8_dequantize(q.cuda(), absmax.cuda(), code.cuda(), 256, dtype)
    assert_same(out_gpu, out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_blockwise8_non_contiguous_and_misaligned(dtype: torch.dtype) -> None:
    code = dynamic_map(True)
    x = torch.randn(300, 70).to(dtype).t()
    q, absmax = ops.blockwise8_quantize(x, code, 128)
    q_gpu, absmax_gpu = ops.blockwise8_quantize(x.cuda(), code.cuda(), 128)
    assert_same(q_gpu, q)
    assert_same(absmax_gpu, absmax)
    # q one byte into its storage: off 16-byte alignment.
    q_base = torch.cat([torch.zeros(1, dtype=torch.uint8), q.reshape(-1)]).cuda()
    out_gpu = ops.blockwise8_dequantize(q_base[1:], absmax.cuda(), code.cuda(), 128, dtype)
    assert_same(out_gpu, ops.blockwise8_dequantize(q.reshape(-1), absmax, code, 128, dtype))


def test_blockwise8_empty() -> None:
    code = dynamic_map(True, device="cuda")
    q, absmax = ops.blockwise8_quantize(torch.empty(0, 3, device="cuda"), code, 256)
    assert q.shape == (0, 3) and absmax.shape == (0,) and q.is_cuda
    out = ops.blockwise8_dequantize(q, absmax, code, 256, torch.float16)
    assert out.shape == (0, 3) and out.dtype == torch.float16 and out.is_cuda


def test_blockwise8_opcheck() -> None:
    x = torch.randn(5, 300, dtype=torch.bfloat16, device="cuda")
    code = dynamic_map(device="cuda")
    torch.library.opcheck(torch.ops.lorakit.blockwise8_quantize, (x, code, 256))
    q, absmax = ops.blockwise8_quantize(x, code, 256)
    args = (q, absmax, code, 256, torch.bfloat16)
    torch.library.opcheck(torch.ops.lorakit.blockwise8_dequantize, args)


def test_blockwise8_mixed_devices_are_an_error() -> None:
    x = torch.randn(256, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        ops.blockwise8_quantize(x, dynamic_map(True), 256)
    q, absmax = ops.blockwise8_quantize(x, dynamic_map(True, device="cuda"), 256)
    with pytest.raises(RuntimeError, match="same device"):
        ops.blockwise8_dequantize(q, absmax.cpu(), dynamic_map(True, device="cuda"), 256)
