"""The causal language-modelling loss (next-token cross-entropy) as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.data.encode import IGNORE
from lorakit.losses.logprobs import DEFAULT_CHUNK_TOKENS, sequence_logprobs


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
) -> tuple[torch.Tensor, int]:
    """:func:`causal_lm_loss_sum` from final hidden states and a linear LM head, without the
    whole batch's logits: see :mod:`lorakit.losses.logprobs` (arguments as
    :func:`~lorakit.losses.logprobs.sequence_logprobs`).

    Returns:
        The sum over trained tokens (a 0-d float32 tensor) and their number.
    """
    logprobs = sequence_logprobs(hidden, head_weight, labels, head_bias, chunk_tokens)
    return -logprobs.sum(), int((labels[:, 1:] != IGNORE).sum())
