"""Next-token prediction on token rows: SFT (loss on the trained tokens) and pre-training."""

from __future__ import annotations

from torch import nn

from lorakit.data.encode import IGNORE
from lorakit.losses import causal_lm_loss_sum, causal_lm_loss_sum_from_hidden
from lorakit.train.batches import Batch
from lorakit.train.objective import ObjectiveOutput
from lorakit.train.objectives.hidden import final_hidden, head_softcap, plain_head


class CausalLMObjective:
    """Summed cross-entropy of each trained token given the ones before it; counted per trained
    token. Batches are :func:`lorakit.data.collate`'s: ``input_ids``, ``position_ids`` (which
    keep packed examples apart) and ``labels`` (:data:`IGNORE` where not trained on).

    With ``fused_ce`` and an LM head that is a plain linear layer without bias, the loss comes
    from the final hidden states through lorakit's fused linear cross-entropy (one chunk of
    tokens' logits at a time, see :mod:`lorakit.train.objectives.hidden`); otherwise from the
    model's logits.
    """

    def __init__(self, pad_id: int, fused_ce: bool = True) -> None:
        self.pad_id, self.fused_ce = pad_id, fused_ce

    def count(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def tokens(self, batch: Batch) -> int:
        return int((batch["input_ids"] != self.pad_id).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        head = plain_head(model) if self.fused_ce else None
        if head is not None and head.bias is None:
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
            hidden = final_hidden(model, **inputs)
            loss_sum, count = causal_lm_loss_sum_from_hidden(
                hidden, head.weight, batch["labels"], softcap=head_softcap(model)
            )
            return ObjectiveOutput(loss_sum, count)
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        )
        loss_sum, count = causal_lm_loss_sum(out.logits, batch["labels"])
        return ObjectiveOutput(loss_sum, count)

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        return means
