r"""Group-relative advantages: each completion's reward against its siblings' (same prompt).

Critic-free policy gradients (GRPO, RLOO) sample ``G`` completions per prompt and use the other
completions of the prompt as the baseline, so no value model is needed.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

AdvantageScale = Literal["group", "batch", "none"]
Baseline = Literal["mean", "leave_one_out"]

# TRL 1.16 GRPOTrainer's guard against groups whose rewards are all equal (std 0).
STD_EPS = 1e-4


class GroupAdvantages(NamedTuple):
    advantages: torch.Tensor
    """(batch,) one advantage per completion, in the rewards' order."""
    reward_std: torch.Tensor
    """(batch,) the standard deviation the advantage was divided by (before ``eps``), or the
    group's when ``scale="none"``."""
    zero_std_fraction: torch.Tensor
    """Share of completions whose group's rewards are all equal: their advantage is 0, they
    teach nothing (a sign that the task is too easy or too hard for the policy)."""


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: AdvantageScale = "group",
    baseline: Baseline = "mean",
    eps: float = STD_EPS,
) -> GroupAdvantages:
    r"""Advantages of ``G = group_size`` completions per prompt, rows ``[g*G, (g+1)*G)`` being
    prompt ``g``'s:

    .. math::

        A_i = \frac{r_i - b_i}{s_i + \epsilon}, \qquad
        b_i = \begin{cases}\bar r_g & \text{mean} \\ \frac{1}{G-1}\sum_{j \ne i} r_j &
        \text{leave\_one\_out}\end{cases}

    - ``baseline="mean"``: GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2), the group's mean.
    - ``baseline="leave_one_out"``: RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting
      REINFORCE Style Optimization for Learning from Human Feedback in LLMs", eq. 5; Kool et al.
      2019), the mean of the other ``G - 1``: an unbiased baseline. It equals
      :math:`\tfrac{G}{G-1}(r_i - \bar r_g)`.
    - ``scale``: :math:`s_i` is the unbiased standard deviation of the group's rewards
      (``group``, GRPO), of the whole batch's (``batch``, as Hu et al. 2025 "REINFORCE++"
      recommend against per-group bias), or 1 with no :math:`\epsilon` (``none``, "Dr. GRPO":
      Liu et al. 2025, who show that the group scale biases towards easy and hard prompts).

    ``baseline="mean"`` with any ``scale`` is TRL 1.16 ``GRPOTrainer``'s ``scale_rewards``
    computation for one reward function.

    Args:
        rewards: (batch,) one reward per completion, ``batch`` a multiple of ``group_size``.
        group_size: completions per prompt (at least 2).
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        baseline: ``"mean"`` or ``"leave_one_out"``.
        eps: added to the standard deviation (TRL's 1e-4).
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: rewards must be (batch,) with batch a multiple of group_size >= 2,"
            f" got shape {tuple(rewards.shape)} and group_size {group_size}"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be group, batch or none, got {scale!r}")
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(
            f"group_advantages: baseline must be mean or leave_one_out, got {baseline!r}"
        )
    groups = rewards.view(-1, group_size)
    if baseline == "mean":
        base = groups.mean(dim=1, keepdim=True).expand_as(groups)
    else:
        base = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    group_std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1)
    advantages = (groups - base).reshape(-1)
    std = rewards.std().expand_as(rewards) if scale == "batch" else group_std
    if scale != "none":
        advantages = advantages / (std + eps)
    zero = torch.isclose(group_std, torch.zeros_like(group_std))
    return GroupAdvantages(advantages, std, zero.to(rewards.dtype).mean())
