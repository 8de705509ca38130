"""The LoRA linear ops against the plain-PyTorch composition: outputs, gradients, opcheck,
torch.compile, and bad input."""

import pytest
import torch

import lora_reference as ref
from conftest import FLOAT_DTYPES
from lorakit import ops
from lorakit.quant import QuantizedAbsmax

# (tokens, in, out): the direct decode kernel (<= 16 rows, in % 32 == 0; 7 rows take its 4-, 2-
# and 1-row variants), the tiled path, rows that start mid-block (in = 100, blocksize 64), leading
# dimensions.
SHAPES = [
    ((1,), 64, 32),
    ((7,), 64, 72),
    ((16,), 96, 300),
    ((17,), 96, 40),
    ((2, 3), 100, 520),
    ((300,), 128, 64),
]


def make_inputs(lead, n_in, n_out, dtype, rank=4, bias=True, dropout=False):
    x = torch.randn(*lead, n_in, dtype=dtype)
    w = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
    b = torch.randn(n_out, dtype=dtype) if bias else None
    a = (torch.randn(rank, n_in) / n_in**0.5).to(dtype)
    lb = torch.randn(n_out, rank, dtype=dtype)
    x_lora = torch.nn.functional.dropout(x, 0.5) if dropout else None
    return x, w, b, a, lb, x_lora


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run(fn, x, w, b, a, lb, scale, x_lora, grad):
    x, b, a, lb, x_lora = leaves(x, b, a, lb, x_lora)
    y = fn(x, w, b, a, lb, scale, x_lora)
    y.backward(grad)
    grads = [t.grad for t in (x, b, a, lb, x_lora) if t is not None]
    return [y.detach(), *grads]


def assert_close_to_reference(ours, low, exact, dtype):
    # Flash-attention's rule for fused low-precision kernels: the error against a float64
    # reference may be at most twice that of plain PyTorch in the same dtype, plus one rounding
    # of the dtype (at least 1e-5 relative for float32) at the largest magnitude: plain PyTorch
    # can be exact by luck where a different summation or rounding order is not.
    floor = max(torch.finfo(dtype).eps, 1e-5)
    for o, lo, ex in zip(ours, low, exact, strict=True):
        bound = 2 * (lo.double() - ex).abs().max() + floor * ex.abs().max()
        assert (o.double() - ex).abs().max() <= bound


def check(fn, dense_w, dtype, inputs, scale=2.0):
    x, _, b, a, lb, x_lora = inputs
    grad = torch.randn(*x.shape[:-1], dense_w.shape[0], dtype=dtype)
    ours = run(fn, x, dense_w, b, a, lb, scale, x_lora, grad)
    low = run(ref.lora_linear, x, dense_w, b, a, lb, scale, x_lora, grad)
    d = [None if t is None else t.double() for t in (x, dense_w, b, a, lb, x_lora)]
    exact = run(ref.lora_linear, d[0], d[1], d[2], d[3], d[4], scale, d[5], grad.double())
    assert_close_to_reference(ours, low, exact, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("lead", "n_in", "n_out"), SHAPES)
@pytest.mark.parametrize("dropout", [False, True])
def test_dense_matches_reference(dtype, lead, n_in, n_out, dropout):
    inputs = make_inputs(lead, n_in, n_out, dtype, dropout=dropout)
    check(ops.lora_linear, inputs[1], dtype, inputs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("lead", "n_in", "n_out"), SHAPES)
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_matches_reference_on_the_dequantized_weight(dtype, lead, n_in, n_out, dropout, bias):
    inputs = make_inputs(lead, n_in, n_out, dtype, bias=bias, dropout=dropout)
    packed, absmax = ops.nf4_quantize(inputs[1], 64)
    w = ops.nf4_dequantize(packed, absmax, 64, inputs[1].shape, dtype)

    def nf4(x, _w, b, a, lb, scale, x_lora):
        return ops.lora_linear_nf4(x, packed, absmax, 64, b, a, lb, scale, x_lora)

    check(nf4, w, dtype, inputs)


def double_quantized(w, blocksize=64):
    """The NF4 op arguments of w with 8-bit scales: (packed, q, nested_absmax, code, offset)."""
    packed, absmax = ops.nf4_quantize(w, blocksize)
    nested = QuantizedAbsmax.from_scales(absmax)
    return packed, nested.q, nested.absmax, nested.code, nested.offset


def nf4_double_quant(packed, q, nested_absmax, code, offset, blocksize=64):
    def nf4(x, _w, b, a, lb, scale, x_lora):
        nested = (nested_absmax, code, offset)
        return ops.lora_linear_nf4(x, packed, q, blocksize, b, a, lb, scale, x_lora, *nested)

    return nf4


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("lead", "n_in", "n_out"), SHAPES)
@pytest.mark.parametrize("dropout", [False, True])
def test_nf4_double_quantized_matches_reference(dtype, lead, n_in, n_out, dropout):
    # (16,) x 96 -> 300 has 450 blocks: the decode kernel crosses a block of 256 nested scales.
    inputs = make_inputs(lead, n_in, n_out, dtype, dropout=dropout)
    args = double_quantized(inputs[1])
    scales = QuantizedAbsmax(*args[1:]).dequantize()
    w = ops.nf4_dequantize(args[0], scales, 64, inputs[1].shape, dtype)
    check(nf4_double_quant(*args), w, dtype, inputs)


@pytest.mark.parametrize(("lead", "n_in", "n_out"), SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_nf4_double_quantized_equals_expanded_scales(lead, n_in, n_out, blocksize):
    # The kernels rebuild each scale as blockwise8_dequantize + offset does, so the results and
    # gradients are the same bits as with the float32 scales expanded first.
    inputs = make_inputs(lead, n_in, n_out, torch.bfloat16, dropout=True)
    args = double_quantized(inputs[1], blocksize)
    scales = QuantizedAbsmax(*args[1:]).dequantize()

    def expanded(x, _w, b, a, lb, scale, x_lora):
        return ops.lora_linear_nf4(x, args[0], scales, blocksize, b, a, lb, scale, x_lora)

    x, w, b, a, lb, x_lora = inputs
    grad = torch.randn(*x.shape[:-1], n_out, dtype=x.dtype)
    got = run(nf4_double_quant(*args, blocksize), x, w, b, a, lb, 2.0, x_lora, grad)
    want = run(expanded, x, w, b, a, lb, 2.0, x_lora, grad)
    for g, e in zip(got, want, strict=True):
        assert torch.equal(g, e)


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_nf4_blocksizes_larger_than_a_row(blocksize):
    # in = 48: a 4096-value block spans 85+ rows, so tiles must round to whole blocks.
    inputs = make_inputs((20,), 48, 600, torch.float32)
    packed, absmax = ops.nf4_quantize(inputs[1], blocksize)
    w = ops.nf4_dequantize(packed, absmax, blocksize, inputs[1].shape, torch.float32)

    def nf4(x, _w, b, a, lb, scale, x_lora):
        return ops.lora_linear_nf4(x, packed, absmax, blocksize, b, a, lb, scale, x_lora)

    check(nf4, w, torch.float32, inputs)


@pytest.mark.parametrize("dropout", [False, True])
def test_nf4_several_tiles(dropout):
    # 8 MiB float32 tiles of in = 1000 hold 2096 rows (a multiple of 8, the rows after which a
    # tile starts on a 64-value block), so 2200 rows take two tiles, the second a short one.
    inputs = make_inputs((20,), 1000, 2200, torch.float32, dropout=dropout)
    packed, absmax = ops.nf4_quantize(inputs[1], 64)
    w = ops.nf4_dequantize(packed, absmax, 64, inputs[1].shape, torch.float32)

    def nf4(x, _w, b, a, lb, scale, x_lora):
        return ops.lora_linear_nf4(x, packed, absmax, 64, b, a, lb, scale, x_lora)

    check(nf4, w, torch.float32, inputs)


def test_rank_zero_is_the_base_linear():
    x, w, b, _, _, _ = make_inputs((5,), 64, 32, torch.float32)
    a, lb = torch.zeros(0, 64), torch.zeros(32, 0)
    torch.testing.assert_close(ops.lora_linear(x, w, b, a, lb, 1.0), x @ w.t() + b)
    packed, absmax = ops.nf4_quantize(w, 64)
    wd = ops.nf4_dequantize(packed, absmax, 64, w.shape, torch.float32)
    y = ops.lora_linear_nf4(x, packed, absmax, 64, b, a, lb, 1.0)
    torch.testing.assert_close(y, x @ wd.t() + b)


def test_empty_batch():
    x, w, b, a, lb, _ = make_inputs((0,), 64, 32, torch.float32)
    assert ops.lora_linear(x, w, b, a, lb, 1.0).shape == (0, 32)
    packed, absmax = ops.nf4_quantize(w, 64)
    assert ops.lora_linear_nf4(x, packed, absmax, 64, b, a, lb, 1.0).shape == (0, 32)


def op_args(dtype, x_lora, double_quant=False):
    """Arguments of lora_linear and of lora_linear_nf4 (the nested ones last, when asked for)."""
    x, w, b, a, lb, xl = make_inputs((3, 5), 64, 48, dtype, dropout=x_lora)
    x, a, lb = (t.requires_grad_() for t in (x, a, lb))
    if double_quant:
        packed, absmax, *nested = double_quantized(w)
    else:
        (packed, absmax), nested = ops.nf4_quantize(w, 64), []
    return (x, w, b, a, lb, 0.5, xl), (x, packed, absmax, 64, b, a, lb, 0.5, xl, *nested)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("x_lora", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck(dtype, x_lora, double_quant):
    dense, nf4 = op_args(dtype, x_lora, double_quant)
    torch.library.opcheck(torch.ops.lorakit.lora_linear, dense)
    torch.library.opcheck(torch.ops.lorakit.lora_linear_nf4, nf4)
    # The backward ops are not differentiable themselves (no double backward): plain inputs.
    x, w, _, a, lb, scale, xl = (t.detach() if isinstance(t, torch.Tensor) else t for t in dense)
    y, xa = torch.ops.lorakit.lora_linear(x, w, None, a, lb, scale, xl)
    g = torch.randn_like(y)
    torch.library.opcheck(torch.ops.lorakit.lora_linear_backward, (g, x, w, a, lb, xa, scale, xl))
    packed, absmax, nested = nf4[1], nf4[2], nf4[9:]
    args = (g, x, packed, absmax, 64, a, lb, xa, scale, xl, *nested)
    torch.library.opcheck(torch.ops.lorakit.lora_linear_nf4_backward, args)


@pytest.mark.parametrize("base", ["dense", "nf4", "nf4 double-quantized"])
def test_torch_compile_fullgraph_forward_and_backward(base):
    dense, quantized = op_args(
        torch.float32, x_lora=False, double_quant=base == "nf4 double-quantized"
    )

    def step(x, a, lb):
        if base != "dense":
            y = ops.lora_linear_nf4(x, *quantized[1:5], a, lb, 0.5, None, *quantized[9:])
        else:
            y = ops.lora_linear(x, dense[1], dense[2], a, lb, 0.5)
        return (y * y).sum()

    x, a, lb = dense[0], dense[3], dense[4]
    expected = torch.autograd.grad(step(x, a, lb), (x, a, lb))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, a, lb), (x, a, lb))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_frozen_weight_is_required():
    x, w, b, a, lb, _ = make_inputs((2,), 64, 32, torch.float32)
    with pytest.raises(ValueError, match="weight must be frozen"):
        ops.lora_linear(x, w.requires_grad_(), b, a, lb, 1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: {**t, "a": t["a"].double()}, "lora_a is Double but x is Float"),
        (lambda t: {**t, "b": t["b"].bfloat16()}, "lora_b is BFloat16 but x is Float"),
        (lambda t: {**t, "bias": t["bias"].half()}, "bias is Half but x is Float"),
        (lambda t: {**t, "x": t["x"].long()}, "x must be float32, float16 or bfloat16"),
        (lambda t: {**t, "a": t["a"][:, :10]}, r"lora_a must be \(r, in\) with in = 64"),
        (lambda t: {**t, "b": t["b"][:, :2]}, r"lora_b must be \(out, r\) = \(32, 4\)"),
        (lambda t: {**t, "bias": t["bias"][:5]}, r"bias must be \(out,\)"),
        (lambda t: {**t, "x_lora": t["x"][:1]}, "x_lora must have x's shape"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    x, w, b, a, lb, _ = make_inputs((2,), 64, 32, torch.float32)
    t = change({"x": x, "a": a, "b": lb, "bias": b, "x_lora": None})
    with pytest.raises(RuntimeError, match=message):
        ops.lora_linear(t["x"], w, t["bias"], t["a"], t["b"], 1.0, t["x_lora"])
    packed, absmax = ops.nf4_quantize(w, 64)
    with pytest.raises(RuntimeError, match=message):
        ops.lora_linear_nf4(t["x"], packed, absmax, 64, t["bias"], t["a"], t["b"], 1.0, t["x_lora"])


def test_bad_nf4_weight_is_a_clear_error():
    x, w, b, a, lb, _ = make_inputs((2,), 64, 32, torch.float32)
    packed, absmax = ops.nf4_quantize(w, 64)
    with pytest.raises(RuntimeError, match="packed has 512 bytes but a \\(32, 64\\) weight"):
        ops.lora_linear_nf4(x, packed[:512], absmax, 64, b, a, lb, 1.0)
    with pytest.raises(RuntimeError, match="absmax has 32 scales but a \\(32, 64\\) weight"):
        ops.lora_linear_nf4(x, packed, absmax, 32, b, a, lb, 1.0)
    with pytest.raises(RuntimeError, match="absmax must be float32"):
        ops.lora_linear_nf4(x, packed, absmax.half(), 64, b, a, lb, 1.0)
    with pytest.raises(RuntimeError, match="blocksize must be one of"):
        ops.lora_linear_nf4(x, packed, absmax, 48, b, a, lb, 1.0)
    with pytest.raises(RuntimeError, match="x is BFloat16"):
        ops.lora_linear(x.bfloat16(), w, b, a, lb, 1.0)


def test_bad_double_quantized_scales_are_a_clear_error():
    x, w, b, a, lb, _ = make_inputs((2,), 64, 32, torch.float32)
    packed, q, nested_absmax, code, offset = double_quantized(w)

    def call(q, nested_absmax, code):
        ops.lora_linear_nf4(x, packed, q, 64, b, a, lb, 1.0, None, nested_absmax, code, offset)

    with pytest.raises(RuntimeError, match="pass nested_absmax and nested_code together"):
        call(q, nested_absmax, None)
    with pytest.raises(RuntimeError, match="absmax must be uint8 when nested_absmax is given"):
        call(q.float(), nested_absmax, code)
    with pytest.raises(RuntimeError, match="absmax must be float32, or uint8 with nested_absmax"):
        call(q, None, None)
    with pytest.raises(RuntimeError, match="nested_absmax has 2 scales but 32 codes"):
        call(q, torch.ones(2), code)
    with pytest.raises(RuntimeError, match="nested_code must be float32 with 256 values"):
        call(q, nested_absmax, code[:16])
