"""The AdamW step ops against torch.optim.AdamW and the plain-PyTorch references."""

import pytest
import torch

import optim_reference as ref
from conftest import FLOAT_DTYPES, bits
from cuda_cases import scaled_midpoint_blocks
from lorakit import ops
from lorakit.quant import dynamic_map

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}


def _state_8bit(n: int) -> list[torch.Tensor]:
    blocks = (n + 255) // 256
    zeros_q = torch.zeros(n, dtype=torch.uint8)
    return [zeros_q, torch.zeros(blocks), zeros_q.clone(), torch.zeros(blocks)]


def test_matches_torch_adamw_over_100_steps() -> None:
    p0 = torch.randn(5000)
    theirs = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    ours, m, v = p0.clone(), torch.zeros(5000), torch.zeros(5000)
    for step in range(1, 101):
        g = torch.randn(5000) * (1 + step % 7)
        theirs.grad = g.clone()
        opt.step()
        ops.adamw_step_(ours, g, m, v, **HYPER, step=step)
    # Same operations in the same order, but torch's lerp and scalar division may round
    # differently (lerp is fused), so each step can differ by an ulp or two of the update
    # (~1e-2 here); 100 such differences stay under 1e-5 absolute on O(1) parameters.
    torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(m, opt.state[theirs]["exp_avg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, opt.state[theirs]["exp_avg_sq"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 1000, 70_001])
def test_32bit_matches_reference_bitwise(dtype: torch.dtype, n: int) -> None:
    p = torch.randn(n).to(dtype)
    m, v = torch.zeros(n), torch.zeros(n)
    rp, rm, rv = p.clone(), m.clone(), v.clone()
    for step in range(1, 6):
        g = torch.randn(n).to(dtype)
        ops.adamw_step_(p, g, m, v, **HYPER, step=step, grad_scale=0.5)
        ref.adamw_step_(rp, g, rm, rv, **HYPER, step=step, grad_scale=0.5)
    # The reference rounds where the kernel rounds (no FMA contraction in the kernel), so the
    # results agree to the bit.
    assert torch.equal(bits(p), bits(rp))
    assert torch.equal(m, rm) and torch.equal(v, rv)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [256, 4096, 10_000])
def test_8bit_matches_reference_bitwise(dtype: torch.dtype, n: int) -> None:
    code_m, code_v = dynamic_map(True), dynamic_map(False)
    p = torch.randn(n).to(dtype)
    state = _state_8bit(n)
    rp, rstate = p.clone(), [t.clone() for t in state]
    for step in range(1, 11):
        g = (torch.randn(n) * torch.rand(1) * 3).to(dtype)
        ops.adamw8bit_step_(p, g, *state, code_m, code_v, **HYPER, step=step)
        ref.adamw8bit_step_(rp, g, *rstate, code_m, code_v, **HYPER, step=step)
        assert torch.equal(bits(p), bits(rp))
        for ours, theirs in zip(state, rstate, strict=True):
            assert torch.equal(ours, theirs)


def test_8bit_zero_gradient_blocks_stay_zero() -> None:
    code_m, code_v = dynamic_map(True), dynamic_map(False)
    p = torch.randn(512)
    state = _state_8bit(512)
    g = torch.zeros(512)
    g[300] = 1.0
    ops.adamw8bit_step_(p, g, *state, code_m, code_v, **HYPER, step=1)
    assert torch.equal(state[1][0], torch.tensor(0.0)) and state[1][1] > 0
    m = ops.blockwise8_dequantize(state[0], state[1], code_m, 256)
    assert torch.equal(m[:256], torch.zeros(256))


def test_bad_input_is_rejected() -> None:
    p, g, m, v = torch.randn(10), torch.randn(10), torch.zeros(10), torch.zeros(10)
    step = {**HYPER, "step": 1}
    with pytest.raises(RuntimeError, match="grad is Double but param is Float"):
        ops.adamw_step_(p, g.double(), m, v, **step)
    with pytest.raises(RuntimeError, match="exp_avg_sq must be Float"):
        ops.adamw_step_(p, g, m, v.half(), **step)
    with pytest.raises(RuntimeError, match="exp_avg has 9 elements, expected 10"):
        ops.adamw_step_(p, g, m[:9], v, **step)
    with pytest.raises(RuntimeError, match="param must be contiguous"):
        ops.adamw_step_(torch.randn(10, 2).t(), g, m, v, **step)
    with pytest.raises(RuntimeError, match="tensors on several devices"):
        ops.adamw_step_(p, g, m.to("meta"), v, **step)
    with pytest.raises(RuntimeError, match="step counts from 1"):
        ops.adamw_step_(p, g, m, v, **{**step, "step": 0})
    with pytest.raises(RuntimeError, match="beta2 must be in"):
        ops.adamw_step_(p, g, m, v, **{**step, "beta2": 1.0})
    q, am, qv, av = _state_8bit(300)
    code = dynamic_map()
    p8, g8 = torch.randn(300), torch.randn(300)
    with pytest.raises(RuntimeError, match="exp_avg_absmax has 1 elements, expected 2"):
        ops.adamw8bit_step_(p8, g8, q, am[:1], qv, av, code, code, **step)
    with pytest.raises(RuntimeError, match="exp_avg must be Byte"):
        ops.adamw8bit_step_(p8, g8, q.float(), am, qv, av, code, code, **step)
    with pytest.raises(RuntimeError, match="code must hold 256 values"):
        ops.adamw8bit_step_(p8, g8, q, am, qv, av, code[:100], code, **step)


def test_opcheck() -> None:
    n = 700
    args32 = (torch.randn(n), torch.randn(n), torch.zeros(n), torch.rand(n))
    torch.library.opcheck(torch.ops.lorakit.adamw_step_, (*args32, 1e-3, 0.9, 0.99, 1e-8, 0.0, 3))
    p, g = torch.randn(n, dtype=torch.bfloat16), torch.randn(n, dtype=torch.bfloat16)
    args8 = (p, g, *_state_8bit(n), dynamic_map(True), dynamic_map(False))
    torch.library.opcheck(
        torch.ops.lorakit.adamw8bit_step_, (*args8, 1e-3, 0.9, 0.99, 1e-8, 0.1, 1)
    )


def test_torch_compile_fullgraph() -> None:
    def step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        ops.adamw_step_(p, g, m, v, **HYPER, step=1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p, g = torch.randn(100), torch.randn(100)
    m, v, q = torch.zeros(100), torch.zeros(100), p.clone()
    compiled(p, g, m, v)
    ref.adamw_step_(q, g, torch.zeros(100), torch.zeros(100), **HYPER, step=1)
    assert torch.equal(p, q)


def _near_every_step(code: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] within 3 ulps of every midpoint of ``code`` and of every power of two
    and lookup-bucket edge (the top 7 mantissa bits change; subnormals included), where the
    kernels' nearest-code answer could go wrong."""
    midpoints = (code[:-1] + code[1:]) / 2
    edges = torch.arange(0, 127 << 7 | 1, dtype=torch.int32).bitwise_left_shift(16)
    centres = torch.cat([midpoints, edges.view(torch.float32)])
    centres = torch.cat([centres, -centres]).view(torch.int32)
    offsets = torch.arange(-3, 4, dtype=torch.int32)
    values = (centres[:, None] + offsets).reshape(-1).view(torch.float32)
    return values[values.abs() <= 1]


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_requantization_multiplies_by_the_reciprocal(signed: bool) -> None:
    # As in the test below, the new first moment is the gradient itself; each block's absmax is
    # 3.7 and its values lie where x * (1 / 3.7) and x / 3.7 pick different codes, so the codes
    # must be those of the reciprocal (bitsandbytes' rule) and would fail for a division.
    code = dynamic_map(signed)
    g = scaled_midpoint_blocks(code, 3.7, signed)
    n = g.numel()
    state = _state_8bit(n)
    hyper = {**HYPER, "beta1": 0.0, "weight_decay": 0.0}
    ops.adamw8bit_step_(torch.zeros(n), g, *state, code, dynamic_map(False), **hyper, step=1)
    midpoints = (code[:-1] + code[1:]) / 2
    scale = torch.tensor(3.7)
    assert torch.equal(state[1], torch.full((n // 256,), 3.7))
    assert torch.equal(state[0].long(), torch.bucketize(g * scale.reciprocal(), midpoints))
    assert not torch.equal(state[0].long(), torch.bucketize(g / scale, midpoints))


def test_8bit_custom_code_with_a_negative_zero_midpoint() -> None:
    # Codes -2^-149 and 0 have the midpoint -0.0: +0.0 takes the lower code and every positive
    # subnormal the upper one, a step the lookup table cannot hold (its key would be compared in
    # the negative half); such a code must take the exact search, not a wrong table entry.
    denorm = torch.tensor(2.0**-149)
    code = torch.cat([torch.linspace(-1, 1, 254), -denorm[None], torch.zeros(1)]).sort().values
    midpoints = (code[:-1] + code[1:]) / 2
    assert midpoints.eq(0).sum() == 1 and midpoints[midpoints.eq(0)].signbit().all()
    tiny = torch.arange(0, 4096, 7, dtype=torch.int32).view(torch.float32)  # +0 and subnormals
    g = torch.cat([tiny, -tiny, _near_every_step(code)])
    g = torch.cat([g, torch.zeros((-g.numel()) % 255)]).reshape(-1, 255)
    g = torch.cat([torch.ones(g.shape[0], 1), g], dim=1).reshape(-1)
    n = g.numel()
    state = _state_8bit(n)
    hyper = {**HYPER, "beta1": 0.0, "weight_decay": 0.0}
    ops.adamw8bit_step_(torch.zeros(n), g, *state, code, dynamic_map(False), **hyper, step=1)
    assert torch.equal(state[0], torch.bucketize(g, midpoints).to(torch.uint8))


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_nearest_code_is_exact_at_every_step(signed: bool) -> None:
    # With beta1 = 0, zero state and grad_scale 1 the new first moment is the gradient itself
    # (0 + 1 * (g - 0) is exact), and a 1.0 in every block makes its absmax 1, so the stored codes
    # must be bucketize(g, midpoints) exactly. The map is passed as the first moment's code, so
    # both maps are checked on the same path.
    code = dynamic_map(signed)
    g = _near_every_step(code)
    if not signed:
        g = g.abs()
    g = torch.cat([g, torch.zeros((-g.numel()) % 255)]).reshape(-1, 255)
    g = torch.cat([torch.ones(g.shape[0], 1), g], dim=1).reshape(-1)
    n = g.numel()
    p = torch.zeros(n)
    state = _state_8bit(n)
    hyper = {**HYPER, "beta1": 0.0, "weight_decay": 0.0}
    ops.adamw8bit_step_(p, g, *state, code, dynamic_map(False), **hyper, step=1)
    expected = torch.bucketize(g, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    assert torch.equal(state[1], torch.ones(n // 256))
    assert torch.equal(state[0], expected)
