r"""The entropy of a model's next-token distributions, a chunk of positions at a time.

.. math::

    H_t = -\sum_v p_{t,v} \log p_{t,v} = \log\textstyle\sum_v e^{z_{t,v}} - \sum_v p_{t,v}\, z_{t,v}

(in nats). RL fine-tuning watches it: a policy whose entropy collapses has stopped exploring
(Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models"); PPO can add it as a bonus.
"""

from __future__ import annotations

import torch

from lorakit.losses.logprobs import DEFAULT_CHUNK_TOKENS


def entropy_from_logits(
    logits: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along the last axis, computed in float32 (float64 for
    float64 logits) ``chunk_tokens`` positions at a time, so that one chunk's probabilities
    exist at a time.

    Args:
        logits: (..., vocab).
        chunk_tokens: positions per chunk.

    Returns:
        ``logits.shape[:-1]``; differentiable (an entropy bonus) but usually taken under
        ``torch.no_grad()`` as a metric.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_tokens):
        z = chunk.to(dtype)
        log_normaliser = torch.logsumexp(z, dim=-1)
        probs = torch.softmax(z, dim=-1)
        parts.append(log_normaliser - (probs * z).sum(-1))
    if not parts:
        return logits.new_zeros(logits.shape[:-1], dtype=dtype)
    return torch.cat(parts).view(logits.shape[:-1])
