"""NF4Weight: double quantization, memory, and the bitsandbytes Linear4bit state-dict layout."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from bnb_reference import bnb_linear4bit_from_state_dict, bnb_linear4bit_state_dict
from conftest import bits
from lorakit.quant import NF4Weight, nf4_code


def test_nf4_code_is_bitsandbytes_table() -> None:
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizes_like_bitsandbytes(double_quant: bool, dtype: torch.dtype) -> None:
    w = (torch.randn(192, 320) * 0.05).to(dtype)
    ours = NF4Weight.from_float(w, blocksize=64, double_quant=double_quant)
    packed, state = bnbf.quantize_4bit(
        w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    assert torch.equal(ours.packed, packed.view(-1))
    if not double_quant:
        assert torch.equal(ours.absmax, state.absmax)
        return
    assert ours.absmax.offset == state.offset.item()
    assert torch.equal(ours.absmax.absmax, state.state2.absmax)
    # The 8-bit scales agree but for the rare codes where bitsandbytes' approximate search picks
    # a farther neighbour (see test_blockwise8_ops); the scales then differ by one 8-bit step.
    assert (ours.absmax.q != state.absmax).float().mean() < 0.01
    bnb_scales = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    torch.testing.assert_close(ours.scales(), bnb_scales, rtol=0.02, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitsandbytes_state_dict_loads_into_lorakit(double_quant: bool, dtype: torch.dtype) -> None:
    w = (torch.randn(96, 130) * 0.05).to(dtype)
    sd = bnb_linear4bit_state_dict(w, double_quant)
    ours = NF4Weight.from_state_dict(sd)
    assert ours.shape == w.shape and ours.dtype == dtype and ours.double_quant == double_quant
    layer = bnb_linear4bit_from_state_dict(sd, w.shape)
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(bits(ours.dequantize()), bits(expected))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lorakit_state_dict_loads_into_bitsandbytes(double_quant: bool, dtype: torch.dtype) -> None:
    w = (torch.randn(64, 256) * 0.05).to(dtype)
    ours = NF4Weight.from_float(w, blocksize=64, double_quant=double_quant)
    sd = ours.state_dict()
    assert set(sd) == set(bnb_linear4bit_state_dict(w, double_quant))  # same keys as bitsandbytes
    layer = bnb_linear4bit_from_state_dict(sd, w.shape)
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(bits(ours.dequantize()), bits(expected))
    x = torch.randn(3, 256, dtype=dtype)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, ours.dequantize()))
    assert torch.equal(bits(NF4Weight.from_state_dict(sd).dequantize()), bits(ours.dequantize()))


def test_prefix_and_round_trip_through_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    ours = NF4Weight.from_float(torch.randn(32, 64), blocksize=32)
    save_file(ours.state_dict("layers.0.q_proj.weight"), tmp_path / "w.safetensors")
    loaded = NF4Weight.from_state_dict(
        load_file(tmp_path / "w.safetensors"), "layers.0.q_proj.weight"
    )
    assert torch.equal(loaded.dequantize(), ours.dequantize())


@pytest.mark.parametrize(("double_quant", "expected_bits"), [(False, 4.5), (True, 4.127)])
def test_bits_per_parameter(double_quant: bool, expected_bits: float) -> None:
    # 4 bits per value plus a float32 scale per 64 values (0.5 bits), or with double
    # quantization an 8-bit scale per 64 (0.125) and a float32 per 256 * 64 values (0.002), plus
    # the code tables (1 KiB: 0.0005 bits at this size).
    ours = NF4Weight.from_float(torch.randn(4096, 4096), blocksize=64, double_quant=double_quant)
    assert ours.bits_per_parameter == pytest.approx(expected_bits, abs=0.002)


def test_corrupt_or_mismatched_state_dict_is_rejected() -> None:
    sd = NF4Weight.from_float(torch.randn(64, 64)).state_dict()
    with pytest.raises(KeyError, match=r"missing 'weight\.absmax'"):
        NF4Weight.from_state_dict({k: v for k, v in sd.items() if k != "weight.absmax"})
    bad = dict(
        sd, **{"weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    )
    with pytest.raises(ValueError, match="readable quant state"):
        NF4Weight.from_state_dict(bad)
    with pytest.raises(ValueError, match="packed bytes do not fit"):
        NF4Weight.from_state_dict(dict(sd, weight=sd["weight"][:-1]))
    with pytest.raises(ValueError, match="not the NF4 code table"):
        NF4Weight.from_state_dict(dict(sd, **{"weight.quant_map": torch.linspace(-1, 1, 16)}))
    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="only NF4 weights are supported"):
        NF4Weight.from_state_dict(fp4)
