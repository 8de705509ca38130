"""The reward-model loss: Bradley-Terry on preference pairs, with a margin and centering."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RewardLossOutput(NamedTuple):
    """Per-pair values, each of shape (pairs,); the metrics are detached.

    Every field is a per-pair quantity whose mean over pairs is the batch's value, so a caller
    can sum each over the micro-batches of an accumulated step and divide by the step's pairs.
    """

    losses: torch.Tensor
    """The loss of each pair; their mean is TRL's ``RewardTrainer`` loss."""
    accuracy: torch.Tensor
    """1.0 where the chosen reward is strictly above the rejected one, else 0.0."""
    margin: torch.Tensor
    """``r_c - r_r`` (the model's margin; a data margin is not subtracted)."""
    reward: torch.Tensor
    """``(r_c + r_r) / 2``: its mean over pairs is the mean of all rewards."""
    reward_sq: torch.Tensor
    """``(r_c^2 + r_r^2) / 2``: with ``reward`` it gives the spread of all rewards,
    ``std = sqrt(mean(reward_sq) - mean(reward)^2)``."""


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> RewardLossOutput:
    r"""Pairwise (Bradley-Terry) reward-model loss.

    .. math::

        \ell_i = -\log \sigma(r_{c,i} - r_{r,i} - m_i) + \eta\,(r_{c,i} + r_{r,i})^2

    The first term is the negative log-likelihood of the preference under the Bradley-Terry
    model (Ouyang et al. 2022, "Training language models to follow instructions with human
    feedback", eq. 1), with the margin ``m`` of Touvron et al. 2023 ("Llama 2", eq. 2) when given.
    The second is the centering term of Eisenstein et al. 2023 ("Helping or Herding? Reward
    Model Ensembles Mitigate but do not Eliminate Reward Hacking"): the Bradley-Terry likelihood
    sees only reward differences, and this term pins the free offset by pulling rewards towards
    zero. It is per pair, so the mean of ``losses`` over a batch is exactly TRL 1.16
    ``RewardTrainer``'s loss with ``center_rewards_coefficient = center_coefficient``.

    Args:
        chosen_rewards: (pairs,) scalar rewards of the preferred completions.
        rejected_rewards: (pairs,) scalar rewards of the other completions.
        margin: (pairs,) or a number: how much the chosen reward should exceed the rejected
            one; ``None`` for no margin.
        center_coefficient: ``eta`` above; 0 turns centering off.

    Returns:
        :class:`RewardLossOutput`, per pair.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            "reward_loss: chosen_rewards and rejected_rewards must both have shape (pairs,), got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    difference = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(difference if margin is None else difference - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return RewardLossOutput(
        losses=losses,
        accuracy=(chosen > rejected).to(chosen.dtype),
        margin=chosen - rejected,
        reward=(chosen + rejected) / 2,
        reward_sq=(chosen.square() + rejected.square()) / 2,
    )
