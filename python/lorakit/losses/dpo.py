"""Direct Preference Optimization and its variants, over summed completion log-probs."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


class DPOLossOutput(NamedTuple):
    """Per-pair values, each of shape (pairs,)."""

    losses: torch.Tensor
    """The loss of each pair; their mean is TRL's ``DPOTrainer`` loss."""
    chosen_rewards: torch.Tensor
    """``beta * (policy_chosen_logps - ref_chosen_logps)``, detached (the implicit reward)."""
    rejected_rewards: torch.Tensor
    """``beta * (policy_rejected_logps - ref_rejected_logps)``, detached."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> DPOLossOutput:
    r"""DPO-family losses on one batch of preference pairs, per pair.

    With the log-ratios :math:`\rho_c = \log\pi(y_c|x) - \log\pi_{ref}(y_c|x)`, likewise
    :math:`\rho_r`, and :math:`\Delta = \rho_c - \rho_r`:

    - ``sigmoid`` (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
      Secretly a Reward Model", eq. 7): :math:`-\log\sigma(\beta\Delta)`.
    - ``hinge`` (after Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
      Feedback"): :math:`\max(0, 1 - \beta\Delta)`.
      SLiC's calibration loss is :math:`\max(0, \delta - \log\pi(y_c|x) + \log\pi(y_r|x))` on the
      policy alone; this form (TRL's) measures log-probs against the reference and sets the
      margin :math:`\delta = 1/\beta`, scaled by :math:`\beta`.
    - ``ipo`` (Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning from
      Human Preferences", eq. 17 with :math:`\tau = \beta`):
      :math:`(\rho_c / n_c - \rho_r / n_r - 1/(2\beta))^2`, where :math:`n` are the completions'
      token counts (at least 1). The paper writes sequence log-ratios; dividing each by its
      length is TRL's choice (its source says the IPO authors confirmed it), so the lengths are
      required for this type.
    - ``robust`` (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with
      Noisy Feedback"), for labels flipped with probability :math:`\varepsilon` =
      ``label_smoothing`` in [0, 0.5):
      :math:`((1-\varepsilon)\ell(\beta\Delta) - \varepsilon\,\ell(-\beta\Delta))/(1-2\varepsilon)`
      with :math:`\ell(z) = -\log\sigma(z)`: unbiased for the clean loss, and unbounded below.

    Each is computed as TRL 1.16 ``DPOTrainer`` computes it (``f_divergence_type="reverse_kl"``,
    one loss type, no weighting), in the same order of operations: the mean of ``losses`` is its
    loss. TRL 1.16 ignores ``label_smoothing`` for the other three types (it no longer has the
    conservative-DPO form of ``sigmoid``); here a nonzero value for them is an error.

    Args:
        policy_chosen_logps: (pairs,) summed completion log-probs of the chosen completions
            under the trained policy.
        policy_rejected_logps: (pairs,) the same for the rejected completions.
        ref_chosen_logps: (pairs,) chosen log-probs under the frozen reference.
        ref_rejected_logps: (pairs,) rejected log-probs under the frozen reference.
        beta: the KL-penalty strength (``tau`` of IPO; the inverse margin of ``hinge``).
        loss_type: ``"sigmoid"``, ``"ipo"``, ``"hinge"`` or ``"robust"``.
        label_smoothing: the assumed label-flip rate of ``robust``.
        chosen_lengths: (pairs,) completion token counts of the chosen completions, as
            ``(labels[:, 1:] != IGNORE).sum(1)``; read by ``ipo`` only.
        rejected_lengths: (pairs,) the same for the rejected completions.

    Returns:
        :class:`DPOLossOutput`: per-pair losses, chosen rewards, rejected rewards.
    """
    check_options(beta, loss_type, label_smoothing)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss: loss_type 'ipo' needs chosen_lengths and rejected_lengths")
        per_token_delta = chosen_logratios / chosen_lengths.clamp(min=1) - (
            rejected_logratios / rejected_lengths.clamp(min=1)
        )
        losses = (per_token_delta - 1 / (2 * beta)) ** 2
    else:
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def check_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raises ValueError unless ``beta`` is positive and finite, ``loss_type`` is known and
    ``label_smoothing`` is in [0, 0.5) for ``robust`` and 0 for the other types."""
    if loss_type not in get_args(DPOLossType):
        raise ValueError(
            f"dpo_loss: loss_type must be one of {', '.join(get_args(DPOLossType))}, "
            f"got {loss_type!r}"
        )
    if not (isinstance(beta, int | float) and 0 < beta < math.inf):
        raise ValueError(f"dpo_loss: beta must be positive and finite, got {beta!r}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"dpo_loss: label_smoothing must lie in [0, 0.5) for loss_type 'robust', "
            f"got {label_smoothing}"
        )
    if loss_type != "robust" and label_smoothing != 0.0:
        raise ValueError(
            f"dpo_loss: label_smoothing applies only to loss_type 'robust', not {loss_type!r}"
        )
