"""PPO / GRPO loss pieces against plain float64 loops written here, and against TRL 1.16's own
code where TRL exposes it (GRPO's loss and metrics, entropy, per-token log-probs).

TRL 1.16 ships no PPO trainer (its PPO was removed from ``trl`` and ``trl.experimental``), so GAE,
whitening, the value loss and the adaptive KL controller are checked against loops that follow
the papers' formulas (Schulman et al. 2016 eq. 16; Ziegler et al. 2019 sec. 2.2) term by term.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.utils import entropy_from_logits as trl_entropy
from trl.trainer.utils import selective_log_softmax

from grpo_reference import grpo_trainer_loss
from lorakit.data.encode import IGNORE
from lorakit.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs_from_logits,
    whiten,
)

# float64 inputs against float64 loops: only summation order differs.
F64 = {"rtol": 1e-12, "atol": 1e-12}


def _right_padded_mask(lengths: list[int], n: int) -> torch.Tensor:
    return (torch.arange(n) < torch.tensor(lengths).unsqueeze(1)).double()


def _masked_mean_loop(values: torch.Tensor, mask: torch.Tensor) -> float:
    total = count = 0.0
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if mask[b, t]:
                total += float(values[b, t])
                count += 1
    return total / count


# ---- KL estimators


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_matches_schulman_estimators(estimator):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    ours = kl_penalty(logp, ref, estimator)
    for b in range(3):
        for t in range(5):
            log_r = float(ref[b, t]) - float(logp[b, t])
            expected = -log_r if estimator == "k1" else (math.exp(log_r) - 1) - log_r
            assert float(ours[b, t]) == pytest.approx(expected, rel=1e-12, abs=1e-14)
    if estimator == "k3":
        assert (ours >= 0).all()


def test_kl_estimators_are_unbiased_for_sampled_tokens():
    # Over tokens sampled from pi, E[k1] = E[k3] = KL(pi || ref) exactly; with 200k samples of a
    # 6-way categorical the Monte-Carlo error is about 3e-3 (std of k1 here ~1, /sqrt(2e5)).
    g = torch.Generator().manual_seed(1)
    pi = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    ref = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = float((pi * (pi.log() - ref.log())).sum())
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    for estimator in ("k1", "k3"):
        sampled = kl_penalty(pi.log()[tokens], ref.log()[tokens], estimator).mean()
        assert float(sampled) == pytest.approx(exact, abs=1.5e-2)


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="estimator must be 'k1' or 'k3'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


# ---- GAE and whitening


def _gae_loop(rewards, values, lengths, gamma, lam):
    batch, n = rewards.shape
    adv = torch.zeros(batch, n, dtype=torch.float64)
    ret = torch.zeros(batch, n, dtype=torch.float64)
    for b in range(batch):
        length = lengths[b]
        running = 0.0
        for t in reversed(range(length)):
            next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            ret[b, t] = running + float(values[b, t])
    return adv, ret


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_the_recursion(gamma, lam):
    g = torch.Generator().manual_seed(2)
    lengths, n = [5, 2, 7, 1], 7
    rewards = torch.randn(4, n, generator=g, dtype=torch.float64)
    values = torch.randn(4, n, generator=g, dtype=torch.float64)
    mask = _right_padded_mask(lengths, n)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_adv, expected_ret = _gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected_adv, **F64)
    torch.testing.assert_close(returns, expected_ret, **F64)


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    # lambda = 1: A_t = sum_k gamma^k r_{t+k} - V_t (Monte-Carlo), whatever the values are.
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(2, 6, generator=g, dtype=torch.float64)
    values = torch.randn(2, 6, generator=g, dtype=torch.float64)
    mask = _right_padded_mask([6, 4], 6)
    advantages, _ = gae(rewards, values, mask, 0.9, 1.0)
    for b, length in enumerate([6, 4]):
        for t in range(length):
            discounted = sum(0.9**k * float(rewards[b, t + k]) for k in range(length - t))
            assert float(advantages[b, t]) == pytest.approx(discounted - float(values[b, t]))


def test_whiten_matches_unbiased_standardisation():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(3, 6, generator=g, dtype=torch.float64) * 3 + 1
    mask = _right_padded_mask([6, 3, 4], 6)
    picked = [float(values[b, t]) for b in range(3) for t in range(6) if mask[b, t]]
    mean = sum(picked) / len(picked)
    var = sum((x - mean) ** 2 for x in picked) / (len(picked) - 1)
    ours, kept_mean = whiten(values, mask), whiten(values, mask, shift_mean=False)
    for b in range(3):
        for t in range(6):
            if mask[b, t]:
                z = (float(values[b, t]) - mean) / math.sqrt(var + 1e-8)
                assert float(ours[b, t]) == pytest.approx(z, rel=1e-12)
                assert float(kept_mean[b, t]) == pytest.approx(z + mean, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 masked values"):
        whiten(values, torch.zeros_like(mask))


def _split_over_processes(fn, parts):
    """``fn(values, mask, total)`` on each ``(values, mask)`` part in a thread of its own, as
    torchrun's processes would run it: ``total`` sums a tensor over the parts (an all-reduce,
    the parts added in a fixed order). Returns each part's result."""
    slots: list = [None] * len(parts)
    # A part that fails breaks the barrier for the others instead of leaving them waiting.
    arrived = threading.Barrier(len(parts), timeout=60)
    results: list = [None] * len(parts)

    def run(i: int) -> None:
        def total(t: torch.Tensor) -> torch.Tensor:
            slots[i] = t
            arrived.wait()
            summed = sum(slots[1:], slots[0])
            arrived.wait()  # every part has read the slots before they are reused
            return summed

        try:
            results[i] = fn(*parts[i], total)
        except BaseException as e:
            results[i] = e
            arrived.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _same_on_every_part(values: list[torch.Tensor]) -> torch.Tensor:
    assert all(torch.equal(v, values[0]) for v in values[1:]), values
    return values[0]


def test_batch_statistics_split_over_processes_equal_the_whole_batchs():
    """Under torchrun each process holds some rows: whitening, the masked mean and the explained
    variance over its rows with ``total`` summing across them equal those of the whole batch."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(5, 6, generator=g, dtype=torch.float64) * 2 - 1
    returns = values + torch.randn(5, 6, generator=g, dtype=torch.float64)
    mask = _right_padded_mask([6, 2, 5, 1, 4], 6)
    cuts = [(0, 2), (2, 5)]
    cases = {
        "whiten": (lambda v, r, m, total: whiten(v, m, total=total), torch.cat),
        "whiten rewards": (
            lambda v, r, m, total: whiten(v, m, shift_mean=False, total=total),
            torch.cat,
        ),
        "masked_mean": (lambda v, r, m, total: masked_mean(v, m, total), _same_on_every_part),
        "explained_variance": (
            lambda v, r, m, total: explained_variance(v, r, m, total),
            _same_on_every_part,
        ),
    }
    for name, (fn, join) in cases.items():
        parts = [(values[a:b], returns[a:b], mask[a:b]) for a, b in cuts]
        split = join(_split_over_processes(fn, parts))
        whole = fn(values, returns, mask, lambda t: t)
        torch.testing.assert_close(split, whole, **F64, msg=name)
    # Local statistics differ: the check can fail.
    local = torch.cat([whiten(values[a:b], mask[a:b]) for a, b in cuts])
    assert not torch.allclose(local * mask, whiten(values, mask) * mask)


# ---- clipped losses


def _policy_loop(logp, old, adv, mask, low, high):
    losses, clipped_low, clipped_high = [], [], []
    for b in range(logp.shape[0]):
        a = float(adv[b]) if adv.dim() == 1 else None
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            a_t = a if a is not None else float(adv[b, t])
            ratio = math.exp(float(logp[b, t]) - float(old[b, t]))
            bounded = min(max(ratio, 1 - low), 1 + high)
            losses.append(-min(ratio * a_t, bounded * a_t))
            clipped_low.append(ratio < 1 - low and a_t < 0)
            clipped_high.append(ratio > 1 + high and a_t > 0)
    n = len(losses)
    return sum(losses) / n, sum(clipped_low) / n, sum(clipped_high) / n


@pytest.mark.parametrize("per_sequence", [True, False])
def test_ppo_policy_loss_matches_the_clipped_surrogate(per_sequence):
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2
    logp = (old + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    shape = (4,) if per_sequence else (4, 6)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = _right_padded_mask([6, 2, 5, 4], 6)
    out = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.28)
    loss, low, high = _policy_loop(logp.detach(), old, adv, mask, 0.2, 0.28)
    assert float(out.loss.detach()) == pytest.approx(loss, rel=1e-12)
    assert float(out.clip_low_fraction) == pytest.approx(low)
    assert float(out.clip_high_fraction) == pytest.approx(high)
    assert float(out.clip_fraction) == pytest.approx(low + high)
    assert 0 < low + high < 1  # the data exercises both branches
    # The gradient flows only where the unclipped term is taken: d(-rho A)/d logp = -rho A / N.
    out.loss.backward()
    a = adv.unsqueeze(1).expand(4, 6) if per_sequence else adv
    ratio = (logp.detach() - old).exp()
    clipped = ((ratio < 0.8) & (a < 0)) | ((ratio > 1.28) & (a > 0))
    expected = torch.where(clipped | (mask == 0), 0.0, -ratio * a) / mask.sum()
    torch.testing.assert_close(logp.grad, expected, **F64)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl_grpo_trainer(beta):
    # TRL's "bnpo" loss: the token mean over the batch of -min(...) + beta * k3, as here.
    g = torch.Generator().manual_seed(6)
    old = -torch.rand(4, 7, generator=g) * 2
    logp = old + torch.randn(4, 7, generator=g) * 0.3
    ref = old + torch.randn(4, 7, generator=g) * 0.3
    adv = torch.randn(4, generator=g)
    mask = _right_padded_mask([7, 3, 5, 6], 7).float()
    ours_logp = logp.clone().requires_grad_()
    out = ppo_policy_loss(ours_logp, old, adv, mask, 0.2, 0.28)
    kl = kl_penalty(ours_logp, ref, "k3")
    ours = out.loss + beta * (kl * mask).sum() / mask.sum()
    trl_logp = logp.clone().requires_grad_()
    theirs, metrics = grpo_trainer_loss(
        trl_logp, old, ref if beta else None, adv, mask.long(), beta, 0.2, 0.28
    )
    # float32, the same operations in the same order up to the masked sums' grouping.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, rtol=1e-6, atol=1e-8)
    assert float(out.clip_low_fraction) == pytest.approx(metrics["clip_ratio/low_mean"], rel=1e-6)
    assert float(out.clip_high_fraction) == pytest.approx(metrics["clip_ratio/high_mean"], rel=1e-6)
    assert float(out.clip_fraction) == pytest.approx(metrics["clip_ratio/region_mean"], rel=1e-6)
    if beta:
        assert float((kl * mask).sum().detach() / mask.sum()) == pytest.approx(
            metrics["kl"], rel=1e-6
        )


def test_ppo_value_loss_matches_the_clipped_squared_error():
    g = torch.Generator().manual_seed(7)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = (old + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = _right_padded_mask([5, 2, 4], 5)
    out = ppo_value_loss(values, old, returns, mask, 0.2)
    terms, clipped, residuals, targets = [], [], [], []
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                continue
            v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            vc = min(max(v, o - 0.2), o + 0.2)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
            clipped.append((vc - r) ** 2 > (v - r) ** 2)
            residuals.append(r - v)
            targets.append(r)

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    assert float(out.loss) == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-12)
    assert float(out.clip_fraction) == pytest.approx(sum(clipped) / len(clipped))
    assert 0 < float(out.clip_fraction) < 1
    assert float(out.explained_variance) == pytest.approx(1 - var(residuals) / var(targets))


# ---- group advantages


def _group_loop(rewards, group, scale, baseline):
    r = [float(x) for x in rewards]
    groups = [r[i : i + group] for i in range(0, len(r), group)]

    def std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for members in groups:
        for x in members:
            if baseline == "mean":
                base = sum(members) / group
            else:
                base = (sum(members) - x) / (group - 1)
            s = {"group": std(members), "batch": std(r), "none": None}[scale]
            out.append((x - base) if s is None else (x - base) / (s + 1e-4))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
def test_group_advantages_match_the_group_formulas(scale, baseline):
    g = torch.Generator().manual_seed(8)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    rewards[4:8] = 0.5  # one group whose rewards are all equal: advantage 0
    out = group_advantages(rewards, 4, scale, baseline)
    expected = _group_loop(rewards, 4, scale, baseline)
    torch.testing.assert_close(out.advantages, torch.tensor(expected, dtype=torch.float64), **F64)
    assert float(out.zero_std_fraction) == pytest.approx(4 / 12)
    assert out.advantages[4:8].abs().max() == 0


def test_leave_one_out_is_the_rescaled_mean_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    mean = group_advantages(rewards, 3, "none").advantages
    loo = group_advantages(rewards, 3, "none", "leave_one_out").advantages
    torch.testing.assert_close(loo, mean * 3 / 2, **F64)


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale must be"):
        group_advantages(torch.zeros(4), 2, "prompt")


# ---- KL controller


def test_adaptive_kl_controller_follows_ziegler_et_al():
    controller = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    value = 0.05
    for kl, n in [(12.0, 64), (6.6, 64), (1.0, 32), (6.0, 64)]:
        error = min(max((kl - 6.0) / 6.0, -0.2), 0.2)
        value = value * (1 + error * n / 10000)
        assert controller.update(kl, n) == pytest.approx(value, rel=1e-15)
    restored = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    assert FixedKLController(0.1).update(100.0, 64) == 0.1


# ---- per-token log-probs and entropy


@pytest.mark.parametrize("chunk_tokens", [1, 3, 512])
def test_token_logprobs_equal_log_softmax_gather_in_float64(chunk_tokens):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = IGNORE
    ours = token_logprobs_from_logits(logits, labels, chunk_tokens)
    plain = torch.zeros(2, 5, dtype=torch.float64)
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != IGNORE:
                plain[b, t] = F.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
    torch.testing.assert_close(ours, plain, **F64)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (expected,) = torch.autograd.grad((plain * weights).sum(), logits)
    torch.testing.assert_close(grad, expected, **F64)


def test_token_logprobs_equal_trl_selective_log_softmax():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 6, 17, generator=g)
    labels = torch.randint(0, 17, (3, 6), generator=g)
    ours = token_logprobs_from_logits(logits, labels)[:, 1:]
    theirs = selective_log_softmax(logits[:, :-1], labels[:, 1:])
    # float32 logsumexp in both; TRL stacks per row, we chunk: rounding only.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_entropy_equals_trl_and_the_definition():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 4, 13, generator=g, dtype=torch.float64) * 3
    ours = entropy_from_logits(logits, chunk_tokens=5)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ours, -(p * p.log()).sum(-1), **F64)
    torch.testing.assert_close(ours, trl_entropy(logits), **F64)
    assert entropy_from_logits(torch.zeros(2, 8)).allclose(torch.full((2,), math.log(8)))
