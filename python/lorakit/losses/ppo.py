r"""Proximal policy optimisation's pieces over per-token tensors: KL penalty, GAE, whitening,
the clipped policy and value losses.

Every tensor is (batch, tokens) over completion tokens, with a ``mask`` (1 on a completion's
tokens, 0 on padding after it). Means are over the masked tokens of the whole batch (one token,
one vote, as TRL's ``masked_mean`` and DAPO's token-level loss), so a long completion weighs
more than a short one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

KLEstimator = Literal["k1", "k3"]

Total = Callable[[torch.Tensor], torch.Tensor]
"""Sums a 0-d tensor over every process that holds part of the batch (under torchrun: an
all-reduce, whose result carries no gradient), so that batch statistics cover the whole batch;
the default is this process's. Statistics taken with one are for targets and metrics, not for
a differentiable loss."""


def _this_process(t: torch.Tensor) -> torch.Tensor:
    return t


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, total: Total = _this_process
) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when the mask is empty), over the batch that
    ``total`` sums (this tensor's, by default)."""
    return total((values * mask).sum()) / total(mask.sum()).clamp(min=1)


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    total: Total = _this_process,
) -> torch.Tensor:
    r"""Standardises ``values`` over the masked tokens:
    :math:`(x - \mu) / \sqrt{\sigma^2 + \epsilon}`.

    :math:`\sigma^2` is the unbiased (Bessel-corrected) variance of the masked values, as TRL's
    ``masked_whiten`` computes it for PPO's advantages (Ziegler et al. 2019's ``whiten``). With
    ``shift_mean=False`` the mean is added back (only the scale changes), as PPO does for rewards.
    Positions outside the mask are returned transformed too; callers mask them. The mean and
    variance are those of the batch that ``total`` sums (see :data:`Total`).

    Raises:
        ValueError: fewer than two masked values (no variance).
    """
    count = total(mask.sum())
    if count < 2:
        raise ValueError(f"whiten: needs at least 2 masked values, got {int(count)}")
    mean = masked_mean(values, mask, total)
    variance = masked_mean((values - mean) ** 2, mask, total) * count / (count - 1)
    out = (values - mean) * torch.rsqrt(variance + eps)
    return out if shift_mean else out + mean


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    r"""Per-token estimate of :math:`\mathrm{KL}(\pi \,\|\, \pi_{ref})` from tokens sampled from
    :math:`\pi`, with :math:`\log r = \log\pi_{ref}(y_t) - \log\pi(y_t)`:

    - ``k1``: :math:`-\log r`, unbiased, high variance, negative on some tokens;
    - ``k3``: :math:`(r - 1) - \log r \ge 0`, unbiased, lower variance.

    Both from J. Schulman, "Approximating KL Divergence" (2020); k3 is GRPO's KL term (Shao et al.
    2024, "DeepSeekMath", eq. 4) and TRL's ``kl_estimator="k3"``. Differentiable in both
    arguments (GRPO puts k3 in the loss; PPO subtracts a detached k1 or k3 from the reward).

    Returns:
        A tensor of the shape of ``logprobs``; mask it before reducing.
    """
    if estimator not in ("k1", "k3"):
        raise ValueError(f"kl_penalty: estimator must be 'k1' or 'k3', got {estimator!r}")
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    return torch.expm1(log_ratio) - log_ratio


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16):

    .. math::

        \delta_t = r_t + \gamma V_{t+1} - V_t, \qquad
        A_t = \delta_t + \gamma\lambda A_{t+1}, \qquad R_t = A_t + V_t,

    with :math:`V` and :math:`A` zero past the last masked token (the episode ends there), as
    TRL's PPO (``ppo_trainer``, ``lastgaelam`` loop) computes them before whitening. Not
    whitened: see :func:`whiten`.

    Args:
        rewards: (batch, tokens) per-token rewards (e.g. the score on the last token minus the
            KL penalty on every token).
        values: (batch, tokens) the value head's estimates, detached.
        mask: (batch, tokens) 1 on completion tokens, 0 after the end (right padding).
        gamma: discount.
        lam: GAE's lambda (bias / variance trade-off).

    Returns:
        ``(advantages, returns)``, each (batch, tokens), zero where ``mask`` is 0; no gradient.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"gae: rewards, values and mask must have one shape (batch, tokens), got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.to(values.dtype)
    rewards, values = rewards.detach() * mask, values.detach() * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    """The token-mean clipped surrogate loss (0-d), differentiable in ``logprobs``."""
    clip_fraction: torch.Tensor
    """Share of tokens whose clipped term was taken (the gradient is zero there)."""
    clip_low_fraction: torch.Tensor
    """Share of tokens with ratio below ``1 - clip_low`` and a negative advantage."""
    clip_high_fraction: torch.Tensor
    """Share of tokens with ratio above ``1 + clip_high`` and a positive advantage."""
    approx_kl: torch.Tensor
    r""":math:`\tfrac12\,\overline{(\log\pi - \log\pi_{old})^2}`, the ``approxkl`` of TRL's PPO."""
    ratio: torch.Tensor
    r"""Token-mean of :math:`\pi / \pi_{old}`."""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> PolicyLossOutput:
    r"""PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", eq. 7), negated and averaged over the masked tokens:

    .. math::

        \rho_t = e^{\log\pi(y_t) - \log\pi_{old}(y_t)}, \qquad
        \ell_t = -\min\big(\rho_t A_t,\ \mathrm{clip}(\rho_t, 1 - \epsilon_{low},
        1 + \epsilon_{high}) A_t\big).

    Separate low and high epsilons are DAPO's "clip-higher" (Yu et al. 2025, eq. 10): a larger
    ``clip_high`` lets unlikely tokens with a positive advantage grow further. With
    ``clip_low == clip_high`` it is PPO's loss; with TRL GRPO's ``loss_type="bnpo"`` averaging
    and ``beta=0`` it is TRL 1.16's GRPO loss.

    Args:
        logprobs: (batch, tokens) the current policy's log-probs of the sampled tokens
            (differentiable).
        old_logprobs: (batch, tokens) the sampling policy's log-probs, detached.
        advantages: (batch, tokens), or (batch,) for one advantage per sequence (GRPO).
        mask: (batch, tokens) 1 on completion tokens.
        clip_low, clip_high: the epsilons below and above 1.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    with torch.no_grad():
        low = ((ratio < 1 - clip_low) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1 + clip_high) & (advantages > 0)).to(mask.dtype)
        return PolicyLossOutput(
            loss=loss,
            clip_fraction=masked_mean(low + high, mask),
            clip_low_fraction=masked_mean(low, mask),
            clip_high_fraction=masked_mean(high, mask),
            approx_kl=0.5 * masked_mean(log_ratio**2, mask),
            ratio=masked_mean(ratio, mask),
        )


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor
    """The clipped value loss (0-d), differentiable in ``values``."""
    clip_fraction: torch.Tensor
    """Share of tokens where the clipped error was the larger one."""
    explained_variance: torch.Tensor
    r""":math:`1 - \mathrm{Var}(R - V) / \mathrm{Var}(R)` over the masked tokens (1: perfect;
    0: no better than a constant; NaN when the returns do not vary)."""


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> ValueLossOutput:
    r"""PPO's clipped value loss, as OpenAI's ``ppo2`` and TRL's PPO compute it:

    .. math::

        \tilde V_t = \mathrm{clip}(V_t, V^{old}_t - c, V^{old}_t + c), \qquad
        \ell = \tfrac12\,\overline{\max\big((V_t - R_t)^2, (\tilde V_t - R_t)^2\big)}

    (the mean over masked tokens). Source: Dhariwal et al., OpenAI Baselines ``ppo2`` (2017);
    its effect is studied in Engstrom et al. 2020, "Implementation Matters in Deep RL".

    Args:
        values: (batch, tokens) the value head's current estimates (differentiable).
        old_values: (batch, tokens) its estimates at rollout time.
        returns: (batch, tokens) the targets (:func:`gae`'s returns).
        mask: (batch, tokens) 1 on completion tokens.
        clip: ``c`` above.
    """
    mask = mask.to(values.dtype)
    old_values, returns = old_values.detach(), returns.detach()
    clipped = torch.clamp(values, old_values - clip, old_values + clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        return ValueLossOutput(
            loss=loss,
            clip_fraction=masked_mean((clipped_error > unclipped_error).to(mask.dtype), mask),
            explained_variance=explained_variance(values, returns, mask),
        )


@torch.no_grad()
def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, total: Total = _this_process
) -> torch.Tensor:
    r""":math:`1 - \mathrm{Var}(R - V) / \mathrm{Var}(R)` over the masked tokens of the batch
    that ``total`` sums (1: perfect; 0: no better than a constant; NaN when the returns do not
    vary)."""
    mask = mask.to(values.dtype)

    def variance(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask, total)) ** 2, mask, total)

    return 1 - variance(returns - values) / variance(returns)
