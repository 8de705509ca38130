"""The causal language-modelling loss (next-token cross-entropy) as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit import ops
from lorakit.data.encode import IGNORE
from lorakit.losses.logprobs import (
    DEFAULT_CHUNK_TOKENS,
    fusable,
    head_operands,
    scored_rows,
    sequence_logprobs,
)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of predicting ``labels[:, t + 1]`` from ``logits[:, t]``.

    Args:
        logits: (batch, n, vocab), any float dtype (computed in float32).
        labels: (batch, n) token ids, :data:`IGNORE` where not trained on.

    Returns:
        The sum over trained tokens (a 0-d float32 tensor) and their number. Summing, not
        averaging, lets the caller divide by the tokens of a whole accumulated step, so that
        gradient accumulation matches one large batch exactly.
    """
    targets = labels[:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total, int((targets != IGNORE).sum())


def causal_lm_loss_sum_from_hidden(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    fused: bool = True,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """:func:`causal_lm_loss_sum` from final hidden states and a linear LM head, without the
    whole batch's logits: with ``fused`` (and no head bias) lorakit's native fused linear
    cross-entropy (:func:`lorakit.ops.fused_linear_cross_entropy`, the gradients formed in the
    same pass), otherwise :func:`~lorakit.losses.logprobs.sequence_logprobs`'s chunked path
    (arguments as there).

    Returns:
        The sum over trained tokens (a 0-d float32 tensor) and their number.
    """
    count = int((labels[:, 1:] != IGNORE).sum())
    if fused and fusable(hidden, head_bias):
        rows, targets, _ = scored_rows(hidden, labels)
        x, weight = head_operands(rows, head_weight)
        return ops.fused_linear_cross_entropy(x, weight, targets, chunk_tokens, softcap), count
    logprobs = sequence_logprobs(
        hidden, head_weight, labels, head_bias, chunk_tokens, fused=False, softcap=softcap
    )
    return -logprobs.sum(), count
