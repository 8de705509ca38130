"""Fused linear cross-entropy / log-probs (lorakit.ops.fused_linear_*) against F.cross_entropy
and log_softmax in float64; both CPU instruction-set paths; opcheck, torch.compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

from conftest import FLOAT_DTYPES
from lorakit import ops

IGNORE = -100
# The CUDA kernels against the same float64 references, where a GPU is lent.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


def inputs(tokens: int, size: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    hidden = torch.randn(tokens, size).to(dtype)
    # Logits of a few units, as a trained head gives: the softmax is neither flat nor one-hot.
    weight = (torch.randn(vocab, size) * 3 / size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,))
    labels[::5] = IGNORE
    return hidden, weight, labels


def logits_of(hidden: torch.Tensor, weight: torch.Tensor, softcap: float) -> torch.Tensor:
    z = hidden @ weight.t()
    return softcap * torch.tanh(z / softcap) if softcap else z


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def plain_ce(
    h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, softcap: float
) -> torch.Tensor:
    """What a model does unfused: logits in the inputs' dtype, cross-entropy in float32."""
    return F.cross_entropy(logits_of(h, w, softcap).float(), labels, reduction="sum")


def assert_within_twice_plain(ours, plain, exact, dtype, what):
    """flash-attention's rule: the fused op's error against float64 is at most twice that of
    plain PyTorch in the same dtype, plus a floor of a few float32 roundings of the values' size
    (for float32 both errors are a few ulps and the factor alone would be noise)."""
    ours_err = (ours.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    floor = 1e-5 * exact.abs().max().item() + 1e-6
    assert ours_err <= 2 * plain_err + floor, f"{what}: {ours_err:.3g} vs plain {plain_err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("chunk_tokens", [0, 7])
@pytest.mark.parametrize(("tokens", "vocab"), [(45, 300), (19, 5003)])  # below / above a block
def test_cross_entropy_and_its_gradients_match_float64(
    device, dtype, softcap, chunk_tokens, tokens, vocab
):
    hidden, weight, labels = (t.to(device) for t in inputs(tokens, 24, vocab, dtype))
    h64, w64 = leaves(hidden.double(), weight.double())
    exact = F.cross_entropy(logits_of(h64, w64, softcap), labels, reduction="sum")
    exact_grads = grads(exact, h64, w64)
    h, w = leaves(hidden, weight)
    plain = plain_ce(h, w, labels, softcap)
    plain_grads = grads(plain, h, w)
    h, w = leaves(hidden, weight)
    ours = ops.fused_linear_cross_entropy(h, w, labels, chunk_tokens, softcap)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    ours_grads = grads(ours * 0.5, h, w)  # backward scales by the incoming gradient
    assert [g.dtype for g in ours_grads] == [dtype, dtype]
    assert_within_twice_plain(ours, plain, exact.detach(), dtype, "loss")
    for name, o, p, e in zip(
        ("hidden", "weight"), ours_grads, plain_grads, exact_grads, strict=True
    ):
        assert_within_twice_plain(o * 2, p, e, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("head_trains", [False, True])
def test_logprobs_and_their_gradients_match_float64(device, dtype, head_trains):
    hidden, weight, labels = (t.to(device) for t in inputs(40, 16, 257, dtype, seed=1))
    upstream = torch.randn(40, device=device)  # DPO / PPO weigh each token's log-prob differently
    softcap = 0.0

    def loss_of(logprobs):
        return (logprobs.double() * upstream.double()).sum()

    h64, w64 = leaves(hidden.double(), weight.double())
    exact_lp = torch.log_softmax(logits_of(h64, w64, softcap), -1)
    exact_lp = exact_lp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * (labels != IGNORE)
    exact_grads = grads(loss_of(exact_lp), h64, w64)
    h, w = leaves(hidden, weight)
    plain_lp = torch.log_softmax(logits_of(h, w, softcap).float(), -1)
    plain_lp = plain_lp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * (labels != IGNORE)
    plain_grads = grads(loss_of(plain_lp), h, w)

    h, w = leaves(hidden, weight)
    w.requires_grad_(head_trains)
    ours = ops.fused_linear_logprobs(h, w, labels, chunk_tokens=9)
    assert ours.dtype == torch.float32 and ours.shape == (40,)
    assert torch.all(ours[labels == IGNORE] == 0)
    assert_within_twice_plain(ours, plain_lp, exact_lp.detach(), dtype, "logprobs")
    ours_grads = grads(loss_of(ours), h, w) if head_trains else grads(loss_of(ours), h)
    # A frozen head has no gradient: only the hidden states' pair is compared then.
    for name, o, p, e in zip(
        ("hidden", "weight"), ours_grads, plain_grads, exact_grads, strict=False
    ):
        assert o.dtype == dtype
        assert_within_twice_plain(o, p, e, dtype, f"grad {name}")


def test_no_gradient_is_formed_without_a_need_and_eval_matches():
    hidden, weight, labels = inputs(20, 8, 50, torch.float32)
    with torch.no_grad():
        loss = ops.fused_linear_cross_entropy(hidden, weight, labels)
    expected = F.cross_entropy(hidden.double() @ weight.double().t(), labels, reduction="sum")
    # float32 logits and sums of 20 terms against float64.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not loss.requires_grad


def test_edge_cases_empty_all_ignored_and_a_vocabulary_below_a_vector():
    hidden, weight, labels = inputs(12, 8, 5, torch.float32)  # 5 < the 8 lanes of the row loop
    h, w = leaves(hidden, weight)
    loss = ops.fused_linear_cross_entropy(h, w, labels)
    expected = F.cross_entropy(hidden.double() @ weight.double().t(), labels, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    h, w = leaves(hidden, weight)
    loss = ops.fused_linear_cross_entropy(h, w, torch.full((12,), IGNORE))
    gh, gw = grads(loss, h, w)
    assert loss.item() == 0 and not gh.any() and not gw.any()
    h, w = leaves(hidden[:0], weight)
    loss = ops.fused_linear_cross_entropy(h, w, labels[:0])
    gh, gw = grads(loss, h, w)
    assert loss.item() == 0 and gh.shape == (0, 8) and not gw.any()


def test_a_non_finite_logit_gives_nan_not_a_silent_number():
    hidden, weight, _ = inputs(4, 8, 40, torch.float32)
    hidden[2, 0] = float("nan")
    logprobs = ops.fused_linear_logprobs(hidden, weight, torch.zeros(4, dtype=torch.long))
    assert torch.isnan(logprobs[2]) and torch.isfinite(logprobs[[0, 1, 3]]).all()


def test_opcheck():
    hidden, weight, labels = inputs(10, 8, 30, torch.float32)
    h, w = leaves(hidden, weight)
    torch.library.opcheck(
        torch.ops.lorakit.fused_linear_cross_entropy, (h, w, labels, True, True, 4, 0.0)
    )
    torch.library.opcheck(torch.ops.lorakit.fused_linear_logprobs, (h, weight, labels, True, 4))
    torch.library.opcheck(torch.ops.lorakit.fused_linear_logprobs, (h, w, labels, False, 0, 5.0))
    args = (torch.randn(10), hidden, weight, labels, True, True, 3, 0.0)
    torch.library.opcheck(torch.ops.lorakit.fused_linear_logprobs_backward, args)


def test_torch_compile_fullgraph_forward_and_backward():
    hidden, weight, labels = inputs(16, 8, 40, torch.float32)

    def step(h, w):
        return (
            ops.fused_linear_cross_entropy(h, w, labels)
            - ops.fused_linear_logprobs(h, w, labels).sum() * 0.5
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h, w = leaves(hidden, weight)
    got = compiled(h, w)
    got_grads = grads(got, h, w)
    h, w = leaves(hidden, weight)
    want = step(h, w)
    torch.testing.assert_close(got, want)
    for g, e in zip(got_grads, grads(want, h, w), strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # the C++ checks and the fake kernel's
def test_bad_input_is_a_clear_error(device):
    hidden, weight, labels = (t.to(device) for t in inputs(6, 8, 30, torch.float32))
    ce = ops.fused_linear_cross_entropy
    with pytest.raises(RuntimeError, match=r"differ in the hidden size|hidden sizes differ"):
        ce(hidden, weight[:, :7], labels)
    dtypes = r"weight is (torch.float16|Half) but hidden is (torch.float32|Float)"
    with pytest.raises(RuntimeError, match=dtypes):
        ce(hidden, weight.half(), labels)
    with pytest.raises(RuntimeError, match=r"labels must be \(tokens,\)"):
        ce(hidden, weight, labels[:5])
    with pytest.raises(RuntimeError, match=r"labels must be (int64|torch.int64|Long)"):
        ce(hidden, weight, labels.int())
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ce(hidden.double(), weight.double(), labels)
    with pytest.raises(RuntimeError, match="softcap must be finite"):
        ce(hidden, weight, labels, 0, float("inf"))


def test_labels_out_of_range_and_devices_are_named():
    hidden, weight, labels = inputs(6, 8, 30, torch.float32)
    bad = labels.clone()
    bad[3] = 30
    with pytest.raises(RuntimeError, match=r"labels\[3\] = 30 is outside the vocabulary \[0, 30\)"):
        ops.fused_linear_cross_entropy(hidden, weight, bad)
    bad[3] = -1
    with pytest.raises(RuntimeError, match=r"labels\[3\] = -1"):
        ops.fused_linear_logprobs(hidden, weight, bad)
    with pytest.raises(RuntimeError, match=r"on several devices|same device"):
        ops.fused_linear_cross_entropy(hidden.to("meta"), weight, labels)
