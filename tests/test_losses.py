"""lorakit.losses' reward and DPO losses against TRL 1.16's own code and float64 formulas."""

import pytest
import torch

from lorakit.losses import dpo_loss, reward_loss
from trl_reference import dpo_trainer_loss, reward_trainer_loss

# Against TRL in float32: the same operations in the same order, so only the order of the
# final mean's reduction may differ (a few float32 ulps, 1 ulp = 6e-8 relative).
TRL_RTOL = 1e-6
# TRL's logged metrics are means of values of order 1; a mean margin may be near 0.
METRIC_ATOL = 1e-6
# Against float64 formulas computed differently (log1p(exp(.)) for log-sigmoid): rounding only.
F64_RTOL = 1e-12

PAIRS = 16


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _rewards(dtype=torch.float32):
    chosen = 2 * torch.randn(PAIRS, dtype=dtype)
    rejected = 2 * torch.randn(PAIRS, dtype=dtype)
    rejected[0] = chosen[0]  # a tie, which counts as not correct
    return chosen, rejected


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trl_reward_trainer(with_margin, center):
    chosen, rejected = _rewards()
    margin = torch.rand(PAIRS) if with_margin else None
    ours_c, ours_r, trl_c, trl_r = _leaves(chosen, rejected, chosen, rejected)

    ours = reward_loss(ours_c, ours_r, margin, center or 0.0)
    theirs, metrics = reward_trainer_loss(trl_c, trl_r, margin, center)
    torch.testing.assert_close(ours.losses.mean(), theirs, rtol=TRL_RTOL, atol=0)

    ours.losses.mean().backward()
    theirs.backward()
    torch.testing.assert_close(ours_c.grad, trl_c.grad, rtol=TRL_RTOL, atol=0)
    torch.testing.assert_close(ours_r.grad, trl_r.grad, rtol=TRL_RTOL, atol=0)

    for name, trl_name in [
        ("accuracy", "accuracy"),
        ("margin", "margin"),
        ("reward", "mean_reward"),
    ]:
        value = getattr(ours, name).mean().item()
        assert value == pytest.approx(metrics[trl_name], rel=TRL_RTOL, abs=METRIC_ATOL), name


@pytest.mark.parametrize("margin", [None, 0.5, "per_pair"])
@pytest.mark.parametrize("center", [0.0, 0.1])
def test_reward_loss_equals_formula_in_float64(margin, center):
    chosen, rejected = _rewards(torch.float64)
    if margin == "per_pair":
        margin = torch.rand(PAIRS, dtype=torch.float64)
    ours_c, ours_r, ref_c, ref_r = _leaves(chosen, rejected, chosen, rejected)

    ours = reward_loss(ours_c, ours_r, margin, center)
    m = 0.0 if margin is None else margin
    expected = torch.log1p(torch.exp(-(ref_c - ref_r - m))) + center * (ref_c + ref_r) ** 2
    torch.testing.assert_close(ours.losses, expected, rtol=F64_RTOL, atol=0)
    ours.losses.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours_c.grad, ref_c.grad, rtol=F64_RTOL, atol=0)
    torch.testing.assert_close(ours_r.grad, ref_r.grad, rtol=F64_RTOL, atol=0)

    everything = torch.cat([chosen, rejected])
    assert ours.accuracy.tolist() == [float(c > r) for c, r in zip(chosen, rejected, strict=True)]
    assert ours.accuracy[0] == 0  # the tie
    torch.testing.assert_close(ours.margin, chosen - rejected, rtol=F64_RTOL, atol=0)
    assert ours.reward.mean().item() == pytest.approx(everything.mean().item(), rel=F64_RTOL)
    spread = (ours.reward_sq.mean() - ours.reward.mean() ** 2).sqrt()
    assert spread.item() == pytest.approx(everything.std(correction=0).item(), rel=1e-9)
    assert not any(t.requires_grad for t in ours[1:])


def test_reward_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"reward_loss: .*shape"):
        reward_loss(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"reward_loss: .*shape"):
        reward_loss(torch.zeros(4, 1), torch.zeros(4, 1))


def _logps(dtype=torch.float32):
    """Summed completion log-probs of realistic size: the policy a few nats from the reference."""
    ref_chosen = -20 - 200 * torch.rand(PAIRS, dtype=dtype)
    ref_rejected = -20 - 200 * torch.rand(PAIRS, dtype=dtype)
    policy_chosen = ref_chosen + 6 * torch.randn(PAIRS, dtype=dtype)
    policy_rejected = ref_rejected + 6 * torch.randn(PAIRS, dtype=dtype)
    lengths = torch.randint(1, 80, (2, PAIRS))
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths[0], lengths[1]


DPO_CASES = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.0),
    ("hinge", 0.1, 0.0),
    ("hinge", 0.3, 0.0),
    ("ipo", 0.1, 0.0),
    ("ipo", 0.5, 0.0),
    ("robust", 0.1, 0.0),
    ("robust", 0.1, 0.1),
    ("robust", 0.2, 0.3),
]


@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing"), DPO_CASES)
def test_dpo_loss_equals_trl_dpo_trainer(loss_type, beta, label_smoothing):
    pc, pr, rc, rr, len_c, len_r = _logps()
    ours_c, ours_r, trl_c, trl_r = _leaves(pc, pr, pc, pr)
    ours = dpo_loss(
        ours_c, ours_r, rc, rr, beta, loss_type, label_smoothing,
        chosen_lengths=len_c, rejected_lengths=len_r,
    )  # fmt: skip
    theirs, metrics = dpo_trainer_loss(
        trl_c, trl_r, rc, rr, beta, loss_type, label_smoothing, len_c, len_r
    )
    torch.testing.assert_close(ours.losses.mean(), theirs, rtol=TRL_RTOL, atol=0)

    ours.losses.mean().backward()
    theirs.backward()
    assert trl_c.grad.abs().sum() > 0  # the comparison below is of real gradients
    torch.testing.assert_close(ours_c.grad, trl_c.grad, rtol=TRL_RTOL, atol=0)
    torch.testing.assert_close(ours_r.grad, trl_r.grad, rtol=TRL_RTOL, atol=0)

    margins = ours.chosen_rewards - ours.rejected_rewards
    for value, trl_name in [
        (ours.chosen_rewards.mean(), "rewards/chosen"),
        (ours.rejected_rewards.mean(), "rewards/rejected"),
        (margins.mean(), "rewards/margins"),
        ((margins > 0).float().mean(), "rewards/accuracies"),
    ]:
        assert value.item() == pytest.approx(metrics[trl_name], rel=TRL_RTOL, abs=METRIC_ATOL)


def _dpo_formula(pc, pr, rc, rr, beta, loss_type, eps, len_c, len_r):
    z = beta * ((pc - rc) - (pr - rr))
    if loss_type == "sigmoid":
        return torch.log1p(torch.exp(-z))
    if loss_type == "hinge":
        return torch.clamp(1 - z, min=0)
    if loss_type == "ipo":
        h = (pc - rc) / len_c - (pr - rr) / len_r
        return (h - 1 / (2 * beta)) ** 2
    return ((1 - eps) * torch.log1p(torch.exp(-z)) - eps * torch.log1p(torch.exp(z))) / (
        1 - 2 * eps
    )


@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing"), DPO_CASES)
def test_dpo_loss_equals_formula_in_float64(loss_type, beta, label_smoothing):
    pc, pr, rc, rr, len_c, len_r = _logps(torch.float64)
    ours_c, ours_r, ref_c, ref_r = _leaves(pc, pr, pc, pr)
    ours = dpo_loss(
        ours_c, ours_r, rc, rr, beta, loss_type, label_smoothing,
        chosen_lengths=len_c, rejected_lengths=len_r,
    )  # fmt: skip
    expected = _dpo_formula(ref_c, ref_r, rc, rr, beta, loss_type, label_smoothing, len_c, len_r)
    torch.testing.assert_close(ours.losses, expected, rtol=F64_RTOL, atol=1e-14)
    ours.losses.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours_c.grad, ref_c.grad, rtol=F64_RTOL, atol=0)
    torch.testing.assert_close(ours_r.grad, ref_r.grad, rtol=F64_RTOL, atol=0)
    torch.testing.assert_close(ours.chosen_rewards, beta * (pc - rc), rtol=F64_RTOL, atol=0)
    torch.testing.assert_close(ours.rejected_rewards, beta * (pr - rr), rtol=F64_RTOL, atol=0)
    assert not ours.chosen_rewards.requires_grad and not ours.rejected_rewards.requires_grad


def test_dpo_loss_defaults_are_sigmoid_with_beta_0_1():
    pc, pr, rc, rr, _, _ = _logps(torch.float64)
    expected = _dpo_formula(pc, pr, rc, rr, 0.1, "sigmoid", 0.0, None, None)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr).losses, expected, rtol=F64_RTOL, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "kto"}, "dpo_loss: loss_type must be one of sigmoid, ipo, hinge, robust"),
        ({"beta": 0.0}, "dpo_loss: beta must be positive"),
        (
            {"loss_type": "robust", "label_smoothing": 0.5},
            r"dpo_loss: label_smoothing must lie in \[0, 0.5\)",
        ),
        (
            {"loss_type": "sigmoid", "label_smoothing": 0.1},
            "dpo_loss: label_smoothing applies only to loss_type 'robust'",
        ),
        (
            {"loss_type": "ipo"},
            "dpo_loss: loss_type 'ipo' needs chosen_lengths and rejected_lengths",
        ),
    ],
)
def test_dpo_loss_rejects_bad_options(kwargs, message):
    logps = torch.zeros(3)
    with pytest.raises(ValueError, match=message):
        dpo_loss(logps, logps, logps, logps, **kwargs)
