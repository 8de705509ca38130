"""Next-token prediction on token rows: SFT (loss on the trained tokens) and pre-training."""

from __future__ import annotations

from torch import nn

from lorakit.data.encode import IGNORE
from lorakit.losses import causal_lm_loss_sum
from lorakit.train.batches import Batch
from lorakit.train.objective import ObjectiveOutput


class CausalLMObjective:
    """Summed cross-entropy of each trained token given the ones before it; counted per trained
    token. Batches are :func:`lorakit.data.collate`'s: ``input_ids``, ``position_ids`` (which
    keep packed examples apart) and ``labels`` (:data:`IGNORE` where not trained on)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def count(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def tokens(self, batch: Batch) -> int:
        return int((batch["input_ids"] != self.pad_id).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        )
        loss_sum, count = causal_lm_loss_sum(out.logits, batch["labels"])
        return ObjectiveOutput(loss_sum, count)

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        return means
