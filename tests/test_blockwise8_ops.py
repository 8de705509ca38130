"""Blockwise 8-bit ops and the dynamic map, against the reference and bitsandbytes."""

import bitsandbytes.functional as bnbf
import pytest
import torch

import nf4_reference as ref
from conftest import FLOAT_DTYPES, bits
from cuda_cases import scaled_midpoint_blocks
from lorakit import ops
from lorakit.quant import dynamic_map


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_map(signed: bool) -> None:
    assert torch.equal(dynamic_map(signed), bnbf.create_dynamic_map(signed))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 1000, 9000])
@pytest.mark.parametrize("signed", [True, False])
def test_matches_reference(dtype: torch.dtype, blocksize: int, n: int, signed: bool) -> None:
    x = torch.randn(n).to(dtype)
    if not signed:
        x = x.abs()
    code = dynamic_map(signed)
    q, absmax = ops.blockwise8_quantize(x, code, blocksize)
    ref_q, ref_absmax = ref.blockwise8_quantize(x, code, blocksize)
    assert torch.equal(q, ref_q)
    assert torch.equal(absmax, ref_absmax)
    out = ops.blockwise8_dequantize(q, absmax, code, blocksize, dtype)
    assert torch.equal(
        bits(out), bits(ref.blockwise8_dequantize(q, absmax, code, blocksize, dtype))
    )


@pytest.mark.parametrize("signed", [True, False])
def test_blocks_are_scaled_by_the_reciprocal_of_their_absmax(signed: bool) -> None:
    # bitsandbytes' rule, x * (1 / absmax) rounded once, not x / absmax: the two differ within
    # an ulp or so of a midpoint, which these blocks are.
    code = dynamic_map(signed)
    x = scaled_midpoint_blocks(code, 3.7, signed)
    q, absmax = ops.blockwise8_quantize(x, code, 256)
    assert torch.equal(absmax, torch.full_like(absmax, 3.7))
    midpoints = (code[:-1] + code[1:]) / 2
    scale = torch.tensor(3.7)
    assert torch.equal(q.long(), torch.bucketize(x * scale.reciprocal(), midpoints))
    assert not torch.equal(q.long(), torch.bucketize(x / scale, midpoints))


def test_agrees_with_bitsandbytes_up_to_near_ties() -> None:
    # bitsandbytes' C++ CPU kernel finds codes with an approximate binary search that picks the
    # farther of two neighbouring codes for about 0.15% of values; ours is the exact nearest code
    # (as bitsandbytes' own PyTorch reference computes it). So: the same scales, few differing
    # codes, and wherever they differ ours is the closer one, up to the float32 rounding of the
    # midpoint that decides (a value within an ulp of a midpoint may go either way).
    x = torch.randn(64, 4096) * torch.rand(64, 1) * 10
    code = dynamic_map()
    q, absmax = ops.blockwise8_quantize(x, code, 256)
    bnb_q, state = bnbf.quantize_blockwise(x, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    differ = q != bnb_q
    assert differ.float().mean() < 0.005
    scaled = (x.reshape(-1, 256) * absmax.reciprocal()[:, None]).reshape(x.shape)
    ours = (scaled - code[q.long()]).abs()
    theirs = (scaled - code[bnb_q.long()]).abs()
    ulp = torch.finfo(torch.float32).eps * scaled.abs()
    assert torch.all(ours[differ] <= theirs[differ] + ulp[differ])
    assert (ours[differ] < theirs[differ]).float().mean() > 0.99
    # The layout is shared: each side dequantizes the other's bytes identically.
    assert torch.equal(
        ops.blockwise8_dequantize(bnb_q, state.absmax, code, 256),
        bnbf.dequantize_blockwise(bnb_q, state),
    )


def test_shape_is_kept_and_zero_block_is_exact() -> None:
    x = torch.zeros(3, 300)
    x[2, 7] = 1.5
    q, absmax = ops.blockwise8_quantize(x, dynamic_map(), 256)
    assert q.shape == x.shape
    assert torch.equal(ops.blockwise8_dequantize(q, absmax, dynamic_map(), 256), x)


def test_bad_input_is_rejected() -> None:
    code = dynamic_map()
    x = torch.randn(512)
    with pytest.raises(RuntimeError, match="must be float32, float16 or bfloat16"):
        ops.blockwise8_quantize(x.long(), code, 256)
    with pytest.raises(RuntimeError, match="code must hold 256 values"):
        ops.blockwise8_quantize(x, code[:255], 256)
    with pytest.raises(RuntimeError, match="sorted ascending"):
        ops.blockwise8_quantize(x, code.flip(0), 256)
    with pytest.raises(RuntimeError, match="power of two from 64 to 4096"):
        ops.blockwise8_quantize(x, code, 100)
    q, absmax = ops.blockwise8_quantize(x, code, 256)
    with pytest.raises(RuntimeError, match="absmax has 2 scales but 512 values"):
        ops.blockwise8_dequantize(q, absmax, code, 128)


def test_opcheck() -> None:
    x = torch.randn(5, 300, dtype=torch.bfloat16)
    code = dynamic_map()
    torch.library.opcheck(torch.ops.lorakit.blockwise8_quantize, (x, code, 256))
    q, absmax = ops.blockwise8_quantize(x, code, 256)
    args = (q, absmax, code, 256, torch.bfloat16)
    torch.library.opcheck(torch.ops.lorakit.blockwise8_dequantize, args)


def test_torch_compile_fullgraph() -> None:
    code = dynamic_map()

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        q, absmax = ops.blockwise8_quantize(x, code, 256)
        return ops.blockwise8_dequantize(q, absmax, code, 256) + 1

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    x = torch.randn(1000)
    assert torch.equal(compiled(x), roundtrip(x))
