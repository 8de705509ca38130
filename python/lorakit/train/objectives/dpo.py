"""Direct preference optimisation's objective: the policy's and the reference's completion
log-probs of both sides of each pair, in one forward pass each, into
:func:`lorakit.losses.dpo_loss`."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.data.encode import IGNORE
from lorakit.losses import DPOLossType, dpo_loss
from lorakit.losses.logprobs import sequence_logprobs, sequence_logprobs_from_logits
from lorakit.models.modes import evaluating
from lorakit.peft import disable_adapters
from lorakit.train import distributed
from lorakit.train.batches import Batch
from lorakit.train.objective import ObjectiveOutput
from lorakit.train.objectives.hidden import final_hidden, head_softcap, plain_head

# Where the reference log-probs come from: the policy with its adapters switched off (no second
# copy of the base), or precomputed ones carried in each batch as ``ref_logps`` (2B,).
ADAPTERS_OFF = "adapters_off"
PRECOMPUTED = "precomputed"


def completion_logps(model: nn.Module, batch: Batch, fused_ce: bool = True) -> torch.Tensor:
    """(rows,) summed log-probs of each row's trained tokens (its completion), float32.

    Where the LM head is a plain linear layer the log-probs come from the final hidden states
    chunk by chunk, never the whole batch's logits (see :mod:`lorakit.train.objectives.hidden`):
    through lorakit's fused op with ``fused_ce``, else under activation checkpointing.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head = plain_head(model)
    if head is not None:
        hidden = final_hidden(model, **inputs)
        labels, softcap = batch["labels"], head_softcap(model)
        return sequence_logprobs(
            hidden, head.weight, labels, head.bias, fused=fused_ce, softcap=softcap
        ).float()
    logits = model(**inputs, use_cache=False).logits
    return sequence_logprobs_from_logits(logits, batch["labels"]).float()


class DPOObjective:
    """DPO (and its IPO, hinge and robust variants) on batches of :func:`lorakit.data.collate_pairs`
    (``2B`` rows: pair ``i`` in rows ``i`` and ``B + i``); counted per pair.

    Metrics, per pair, as TRL's DPOTrainer logs them: the implicit rewards of both sides
    (``chosen_reward``, ``rejected_reward``: ``beta`` times the log-ratio to the reference), how
    often the chosen one is higher (``reward_accuracy``), their difference (``reward_margin``),
    and the policy's completion log-probs (``chosen_logp``, ``rejected_logp``).

    Args:
        reference: :data:`ADAPTERS_OFF` (the policy with its adapters disabled),
            :data:`PRECOMPUTED` (``ref_logps`` in each batch), or a frozen model.
        beta, loss_type, label_smoothing: as :func:`lorakit.losses.dpo_loss` takes them.
        fused_ce: log-probs through lorakit's fused op where the head is a plain linear layer.
    """

    def __init__(
        self,
        reference: str | nn.Module,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        fused_ce: bool = True,
    ) -> None:
        self.reference, self.beta = reference, beta
        self.loss_type, self.label_smoothing = loss_type, label_smoothing
        self.fused_ce = fused_ce

    def count(self, batch: Batch) -> int:
        return int(batch["margin"].shape[0])

    def tokens(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(rows,) the reference's completion log-probs."""
        if isinstance(self.reference, nn.Module):
            return completion_logps(self.reference, batch, self.fused_ce)
        if self.reference == PRECOMPUTED:
            return batch["ref_logps"]
        inner = distributed.unwrapped(model)
        # Dropout off too: the reference is a fixed function of the pair.
        with disable_adapters(inner), evaluating(inner):
            return completion_logps(inner, batch, self.fused_ce)

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        pairs = self.count(batch)
        reference = self.reference_logps(model, batch)
        policy = completion_logps(model, batch, self.fused_ce)
        lengths = (batch["labels"][:, 1:] != IGNORE).sum(1)
        out = dpo_loss(
            policy[:pairs],
            policy[pairs:],
            reference[:pairs],
            reference[pairs:],
            self.beta,
            self.loss_type,
            self.label_smoothing,
            chosen_lengths=lengths[:pairs],
            rejected_lengths=lengths[pairs:],
        )
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        metrics = {
            "chosen_reward": float(chosen.sum()),
            "rejected_reward": float(rejected.sum()),
            "reward_accuracy": float((chosen > rejected).float().sum()),
            "reward_margin": float((chosen - rejected).sum()),
            "chosen_logp": float(policy[:pairs].detach().sum()),
            "rejected_logp": float(policy[pairs:].detach().sum()),
        }
        return ObjectiveOutput(out.losses.sum(), pairs, metrics)

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        return means
