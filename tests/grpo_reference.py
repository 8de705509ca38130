"""TRL 1.16's GRPO loss code, called on given per-token log-probs.

TRL computes GRPO's loss inside ``GRPOTrainer._compute_loss`` after a forward pass. This calls
that method unchanged with the smallest ``self`` it reads (a one-process run, no vLLM, no
entropy masking or bonus) and a stand-in for its per-token log-prob pass that returns the given
log-probs, so that the clipped ratio, the k3 KL, the masked averaging and the clip-fraction
metrics are TRL's own code.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import nn
from trl import GRPOTrainer


def _identity(tensor: torch.Tensor, **_: object) -> torch.Tensor:
    return tensor  # accelerate's gather / reduce without a process group


def grpo_trainer_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str = "bnpo",
) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's GRPO loss (``loss_type``) and its logged metrics for these log-probs."""
    entropies = torch.zeros_like(logprobs)

    def per_token_logps(*_: object, **__: object) -> tuple[torch.Tensor, torch.Tensor, None]:
        return logprobs, entropies, None

    model = nn.Module()
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(gather=_identity, reduce=_identity),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=per_token_logps,
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_vllm=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
    )
    rows, n = logprobs.shape
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, n, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logprobs,
    }
    if ref_logprobs is not None:
        inputs["ref_per_token_logps"] = ref_logprobs
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}
