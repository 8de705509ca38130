"""A reward model's objective: Bradley-Terry on preference pairs, one scalar per sequence."""

from __future__ import annotations

import math

from torch import nn

from lorakit.losses import reward_loss
from lorakit.train.batches import Batch
from lorakit.train.objective import ObjectiveOutput


class RewardObjective:
    """Scores both sides of each pair in one forward pass of a ``*ForSequenceClassification``
    model with one label (its head reads the last non-pad token, as transformers does when the
    model is served) and applies :func:`lorakit.losses.reward_loss`; counted per pair.

    Batches are :func:`lorakit.data.collate_pairs`'s: ``2B`` rows, pair ``i`` in rows ``i``
    (chosen) and ``B + i`` (rejected), and ``margin`` (B,). Metrics, per pair: ``accuracy``
    (chosen scored above rejected), ``margin`` (``r_c - r_r``), ``reward`` (the mean reward) and,
    after :meth:`summarize`, ``reward_std`` (the spread of all rewards).

    Args:
        center_coefficient: weight of the centering term (see :func:`reward_loss`).
        use_margin: subtract the data's per-pair margin inside the loss.
    """

    def __init__(self, center_coefficient: float = 0.0, use_margin: bool = True) -> None:
        self.center_coefficient, self.use_margin = center_coefficient, use_margin

    def count(self, batch: Batch) -> int:
        return int(batch["margin"].shape[0])

    def tokens(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        scores = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits.float()
        pairs = self.count(batch)
        chosen, rejected = scores[:pairs, 0], scores[pairs:, 0]
        out = reward_loss(
            chosen,
            rejected,
            batch["margin"] if self.use_margin else None,
            self.center_coefficient,
        )
        metrics = {
            "accuracy": float(out.accuracy.sum()),
            "margin": float(out.margin.sum()),
            "reward": float(out.reward.sum()),
            "reward_sq": float(out.reward_sq.sum()),
        }
        return ObjectiveOutput(out.losses.sum(), pairs, metrics)

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Turns the mean of squared rewards into their spread (standard deviation)."""
        means = dict(means)
        square = means.pop("reward_sq")
        means["reward_std"] = math.sqrt(max(0.0, square - means["reward"] ** 2))
        return means
