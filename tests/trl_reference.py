"""TRL 1.16's own loss code, called on given rewards / log-probs.

TRL computes its losses inside ``RewardTrainer.compute_loss`` and ``DPOTrainer._compute_loss``,
after a forward pass of the model. These helpers call those methods unchanged, with the
smallest ``self`` they read (the attributes a one-process run sets) and a stand-in model whose
forward returns the given rewards / per-token log-probs, so that everything after the forward
pass is TRL's code. With ``precompute_ref_logps`` the reference log-probs come from the batch,
as they do in TRL when precomputed.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import nn
from trl import DPOTrainer, RewardTrainer


class _Outputs(nn.Module):
    """A model whose forward returns fixed outputs (what TRL reads after its forward pass)."""

    def __init__(self, **outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = SimpleNamespace(**outputs)

    def forward(self, **inputs: object) -> SimpleNamespace:
        return self.outputs


def _gather_one_process(tensor: torch.Tensor) -> torch.Tensor:
    return tensor  # what accelerate's gather returns without a process group


def _one_process(model: nn.Module, **attributes: object) -> SimpleNamespace:
    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        gather=_gather_one_process,
        gather_for_metrics=_gather_one_process,
    )
    return SimpleNamespace(
        model=model,
        accelerator=accelerator,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attributes,
    )


def reward_trainer_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None,
    center_rewards_coefficient: float | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's RewardTrainer loss and its logged metrics for these rewards."""
    model = _Outputs(logits=torch.cat([chosen, rejected]).unsqueeze(-1))
    trainer = _one_process(
        model, args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient)
    )
    inputs: dict[str, torch.Tensor] = {
        "attention_mask": torch.ones(2 * len(chosen), 4, dtype=torch.long)
    }
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def dpo_trainer_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's DPOTrainer loss and its logged metrics for these summed log-probs.

    The stand-in model's per-token log-probs put each sequence's sum on its first completion
    token and zeros elsewhere (TRL sums them over the sequence); the completion masks hold
    ``*_lengths`` tokens, which TRL's IPO divides by.
    """
    lengths = torch.cat([chosen_lengths, rejected_lengths])
    rows, n = len(lengths), int(lengths.max()) + 2
    position = torch.arange(n)
    completion_mask = (position >= n - lengths.unsqueeze(1)).long()
    first = torch.zeros(rows, n - 1)
    first[torch.arange(rows), n - 1 - lengths] = 1.0
    per_token = torch.cat([policy_chosen, policy_rejected]).unsqueeze(1) * first
    zeros = torch.zeros(rows, n - 1)
    model = _Outputs(
        log_probs=per_token,
        entropy=zeros,
        mean_logits=zeros,
        is_top1=zeros.bool(),
    )
    trainer = _one_process(
        model,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    inputs = {
        "input_ids": torch.zeros(rows, n, dtype=torch.long),
        "attention_mask": torch.ones(rows, n, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}
