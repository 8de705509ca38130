"""NF4Linear's storage (one uint8 row per block, lorakit.quant.nf4_storage): the same bytes as the
NF4Weight it was made from, bitsandbytes' keys only in the state dict, and no cast by float casts
of the model."""

import pytest
import torch

from lorakit.nn import NF4Linear
from lorakit.quant import NF4Weight, QuantizedAbsmax
from lorakit.quant.nf4_storage import block_rows, from_block_rows, nested_part


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(33, 65), (64, 128)])
def test_rows_hold_the_same_bytes_as_the_weight(shape, double_quant) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    weight = NF4Weight.from_float(w, 64, double_quant)
    codes, scales = block_rows(weight)
    blocks = -(-w.numel() // 64)
    assert codes.shape == (blocks, 32) and codes.dtype == torch.uint8
    assert scales.shape == (blocks, 1 if double_quant else 4) and scales.dtype == torch.uint8
    # The last row is padded with zero bytes past the weight's codes (33 * 65 is not a whole
    # number of blocks).
    assert not codes.reshape(-1)[weight.packed.numel() :].any()
    back = from_block_rows(codes, scales, nested_part(weight), weight.shape, weight.dtype, 64)
    assert torch.equal(back.packed, weight.packed)
    if double_quant:
        assert isinstance(back.absmax, QuantizedAbsmax)
        assert torch.equal(back.absmax.q, weight.absmax.q)
    else:
        assert torch.equal(back.absmax, weight.absmax)
    assert torch.equal(back.dequantize(), weight.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_has_bitsandbytes_keys_and_casts_leave_the_storage(double_quant) -> None:
    linear = torch.nn.Linear(65, 33)
    layer = NF4Linear.from_linear(linear, 64, double_quant)
    keys = set(layer.state_dict())
    assert "weight_codes" not in keys and "weight_scales" not in keys
    assert {"weight", "weight.absmax", "weight.quant_map", "bias"} <= keys
    before = layer.weight.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.weight_codes.dtype == layer.weight_scales.dtype == torch.uint8
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    # The scales were not rounded to bfloat16: the weight expands to the same float32 values.
    assert torch.equal(layer.weight.dequantize(torch.float32), before)
    fresh = NF4Linear.from_linear(torch.nn.Linear(65, 33), 64, double_quant)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight_codes, layer.weight_codes)
