"""LoRALinear against PEFT's LoRA layer, and NF4Linear against bitsandbytes' Linear4bit."""

import copy
import math

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn

from lorakit import ops
from lorakit.nn import LoRALinear, NF4Linear


class One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def peft_layer(base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora=False):
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["layer"], use_rslora=rslora
    )
    return peft.get_peft_model(One(copy.deepcopy(base)), config).base_model.model.layer


def share_adapter(ours: LoRALinear, theirs: nn.Module) -> None:
    # A random B, so that the low-rank path contributes (a fresh adapter has B = 0).
    with torch.no_grad():
        ours.lora_B["default"].normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"])
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"])


def assert_float32_close(got, expected):
    # Float32 sums of n ~ 100-200 terms reordered differ by about sqrt(n) * 6e-8 relative to the
    # largest term, worst case n * 6e-8 ~ 1e-5: compare against the tensor's scale, not element
    # by element (an element that cancels to near zero has no meaningful relative error).
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert (g - e).abs().max() <= 1e-5 * e.abs().max()


def outputs_and_grads(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_peft_on_linear(bias, rslora, dropout):
    base = nn.Linear(96, 80, bias=bias)
    ours = LoRALinear(copy.deepcopy(base), r=8, alpha=16, dropout=dropout, use_rslora=rslora)
    theirs = peft_layer(base, 8, 16, dropout, rslora)
    share_adapter(ours, theirs)
    x = torch.randn(4, 7, 96)
    # Same seed: both draw the dropout mask first, from the same generator.
    torch.manual_seed(1)
    got = outputs_and_grads(ours, ours.lora_A["default"], ours.lora_B["default"], x)
    torch.manual_seed(1)
    a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    expected = outputs_and_grads(theirs, a, b, x)
    # Both compute in float32 the same products, summed in a different order (one GEMM
    # accumulating into the other's output vs two outputs added).
    assert_float32_close(got, expected)


def test_matches_peft_on_bitsandbytes_4bit():
    base = nn.Linear(128, 64)
    bnb_layer = to_bnb_4bit(base)
    ours = LoRALinear(NF4Linear.from_linear(base), r=4, alpha=8)
    theirs = peft_layer(bnb_layer, 4, 8)
    share_adapter(ours, theirs)
    x = torch.randn(10, 128)
    got = outputs_and_grads(ours, ours.lora_A["default"], ours.lora_B["default"], x)
    a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    expected = outputs_and_grads(theirs, a, b, x)
    # The same NF4 codes and (up to rare last-bit differences of the 8-bit scales, see
    # test_nf4_weight.py) the same scales, so float32 summation order is again what differs.
    assert_float32_close(got, expected)


def test_new_adapter_leaves_output_unchanged_and_a_is_kaiming_uniform():
    base = nn.Linear(256, 32)
    layer = LoRALinear(copy.deepcopy(base), r=16, alpha=32)
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / math.sqrt(256)
    a = layer.lora_A["default"].detach()
    assert a.abs().max() <= bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "lora_A.default",
        "lora_B.default",
    ]


@pytest.mark.parametrize("r", [0, -1, 33, 2.0])
def test_rank_must_fit_the_layer(r):
    with pytest.raises(
        ValueError, match=r"rank r must be an integer from 1 to min\(in, out\) = 32"
    ):
        LoRALinear(nn.Linear(64, 32), r=r, alpha=1)


def test_rejects_other_modules_and_bad_dropout():
    with pytest.raises(TypeError, match=r"wraps nn\.Linear or NF4Linear, got Conv2d"):
        LoRALinear(nn.Conv2d(3, 3, 1), r=1, alpha=1)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRALinear(nn.Linear(8, 8), r=1, alpha=1, dropout=1.0)


def test_dtype_mix_is_a_clear_error():
    layer = LoRALinear(nn.Linear(64, 32), r=4, alpha=8)
    with pytest.raises(RuntimeError, match="lora_a is Float but x is BFloat16"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))


def to_bnb_4bit(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(),
        requires_grad=False,
        quant_type="nf4",
        blocksize=64,
        compress_statistics=True,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # quantizes


def test_nf4_linear_matches_bitsandbytes_and_shares_its_state_dict():
    base = nn.Linear(192, 40)
    ours = NF4Linear.from_linear(base)
    theirs = to_bnb_4bit(base)
    x = torch.randn(3, 192)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    state = ours.state_dict()
    assert set(state) == set(theirs.state_dict())
    for key in ("weight", "bias", "weight.quant_map", "weight.nested_quant_map"):
        assert torch.equal(state[key].view(-1), theirs.state_dict()[key].view(-1)), key
    # The 8-bit scales may differ in a rare last bit (see test_nf4_weight.py).
    q, their_q = state["weight.absmax"], theirs.state_dict()["weight.absmax"]
    assert (q != their_q).float().mean() < 0.01
    # bitsandbytes' state dict into a fresh NF4Linear, and ours into a Linear4bit.
    loaded = NF4Linear.from_linear(nn.Linear(192, 40))
    loaded.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(loaded(x), ours(x))
    # bitsandbytes reads a saved 4-bit layer with Params4bit.from_prequantized (what
    # transformers calls when loading a quantized checkpoint).
    other = bnb.nn.Linear4bit(192, 40, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    other.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu")
    other.bias = nn.Parameter(state["bias"])
    torch.testing.assert_close(other(x), ours(x))


def test_nf4_linear_state_dict_errors():
    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    state = layer.state_dict()
    del state["weight.absmax"]
    with pytest.raises(RuntimeError, match=r"missing 'weight\.absmax'"):
        layer.load_state_dict(state)
    wrong = NF4Linear.from_linear(nn.Linear(64, 16)).state_dict()
    with pytest.raises(RuntimeError, match=r"shape \[16, 64\] does not match \[32, 64\]"):
        layer.load_state_dict(wrong)


def test_nf4_linear_follows_dtype_casts():
    layer = NF4Linear.from_linear(nn.Linear(64, 32)).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def random_lora(quantized: bool) -> LoRALinear:
    """A 64 -> 48 LoRA layer (r = 4) over a dense or NF4 base, B random so the adapter counts."""
    base = nn.Linear(64, 48)
    layer = LoRALinear(NF4Linear.from_linear(base) if quantized else base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    return layer


@pytest.mark.parametrize("quantized", [False, True])
def test_torch_compile_fullgraph_training_step(quantized):
    layer = random_lora(quantized)
    x = torch.randn(6, 64)

    def step(x):
        return layer(x).square().sum()

    expected = torch.autograd.grad(step(x), (layer.lora_A["default"], layer.lora_B["default"]))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x), (layer.lora_A["default"], layer.lora_B["default"]))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("rows", [1, 40])  # the decode kernel and the tiled path
def test_forward_that_records_no_grad_equals_the_recorded_one(quantized, rows):
    # Calls that autograd would not record skip the op's autograd kernel: the values must not
    # change, and a call that does need grad must still get one.
    layer = random_lora(quantized)
    x = torch.randn(rows, 64)
    recorded = layer(x)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        under_no_grad = layer(x)
    with torch.inference_mode():
        under_inference = layer(x)
    layer.requires_grad_(False)
    frozen = layer(x)
    x_with_grad = x.clone().requires_grad_()
    through_x = layer(x_with_grad)
    for got in (under_no_grad, under_inference, frozen):
        assert got.grad_fn is None
        torch.testing.assert_close(got, recorded, rtol=0, atol=0)
    (grad_x,) = torch.autograd.grad(through_x.sum(), x_with_grad)
    weight = layer.base.weight.dequantize(torch.float32) if quantized else layer.base.weight
    delta = layer.lora_B["default"] @ layer.lora_A["default"] * layer.settings["default"].scaling
    torch.testing.assert_close(grad_x, (weight + delta).sum(0).expand(rows, -1))


@pytest.mark.parametrize("quantized", [False, True])
def test_a_trainable_bias_or_dropout_input_alone_still_gets_its_gradient(quantized):
    # Each of the op's differentiable inputs on its own sends the call through autograd.
    layer = random_lora(quantized)
    layer.requires_grad_(False)
    layer.base.bias.requires_grad_(True)
    x = torch.randn(5, 64)
    (grad_bias,) = torch.autograd.grad(layer(x).square().sum(), layer.base.bias)
    torch.testing.assert_close(grad_bias, 2 * layer(x).sum(0))
    # x_lora (the low-rank path's input after dropout) is the op's last differentiable input.
    x_lora = torch.randn(5, 64, requires_grad=True)
    a, b = layer.lora_A["default"], torch.randn(48, 4)
    bias = layer.base.bias.detach()
    if quantized:
        w = layer.base.weight
        y = ops.lora_linear_nf4(x, w.packed, w.scales(), w.blocksize, bias, a, b, 2.0, x_lora)
    else:
        y = ops.lora_linear(x, layer.base.weight, bias, a, b, 2.0, x_lora)
    (grad_x_lora,) = torch.autograd.grad(y.sum(), x_lora)
    torch.testing.assert_close(grad_x_lora, (2.0 * b @ a).sum(0).expand(5, -1))


def test_a_parametrized_base_weight_is_used_as_computed():
    base = nn.Linear(16, 8)

    class Doubled(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(base, "weight", Doubled())
    layer = LoRALinear(base, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 16)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    doubled = 2 * base.parametrizations.weight.original
    expected = x @ doubled.t() + base.bias + 2.0 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("quantized", [False, True])
def test_torch_compile_fullgraph_decode_without_grad(quantized):
    layer = random_lora(quantized)
    with torch.no_grad():
        x = torch.randn(1, 64)
        expected = layer(x)
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected)
