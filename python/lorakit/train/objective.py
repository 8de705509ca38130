"""What the training loop optimises, apart from the loop: an objective and a batch source.

The loop (:class:`lorakit.train.Trainer`) knows neither the loss nor the data's shape. An
:class:`Objective` turns a batch into ``(loss_sum, count, metrics)``: the loss summed over the
batch's counted items (trained tokens for SFT, pairs for reward models and DPO), their number,
and extra metrics also summed over those items. Summing lets the loop divide by the items of a
whole accumulated step on every rank, so accumulation and data parallelism equal one large batch,
and it reports every metric as a mean per item without knowing its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lorakit.train.batches import Batch


@dataclass
class ObjectiveOutput:
    """One batch's loss and metrics, each summed over the batch's ``count`` items."""

    loss_sum: torch.Tensor
    count: int
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """A training objective: see the module docstring."""

    def count(self, batch: Batch) -> int:
        """The items ``batch``'s loss is summed over, known before the forward pass (the loop
        needs a step's total to scale each micro-batch's gradient)."""
        ...

    def tokens(self, batch: Batch) -> int:
        """Non-padding tokens in ``batch`` (for the tokens-per-second metric)."""
        ...

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """The batch's loss sum, item count and metric sums (``model`` may be DDP-wrapped)."""
        ...

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """The metrics to report, from the means per item of the loss and every metric over a
        step (or a validation pass): where a reported value is not itself such a mean (a
        standard deviation, say)."""
        ...
