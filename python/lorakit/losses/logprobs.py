r"""Summed log-probabilities of labelled tokens, one chunk of tokens' logits at a time.

For a sequence with labels :math:`y` (``IGNORE`` where not scored), the summed log-probability is

.. math::

    \log \pi(y) = \sum_{t:\, y_{t+1} \ne \mathrm{IGNORE}} \big(z_{t, y_{t+1}} - \log\textstyle\sum_v
    e^{z_{t,v}}\big), \qquad z_t = W h_t + b .

The float32 logits of a whole batch, (tokens, vocab), are what dominates the memory of DPO and
of SFT with a large vocabulary (at 128K tokens, 512 MiB per thousand tokens). Here each chunk of
``chunk_tokens`` positions is computed under activation checkpointing (non-reentrant), which keeps
only the chunk's inputs for backward and recomputes its logits there: one chunk's logits exist at
a time, in the forward pass and in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from lorakit.data.encode import IGNORE

# 512 positions x 128K vocabulary x 4 bytes = 256 MiB per float32 buffer of one chunk; the
# matmul of one chunk (512 x hidden x vocab) is still large enough to run at full speed.
DEFAULT_CHUNK_TOKENS = 512


def _chunk_logprobs(
    to_logits: Callable[..., torch.Tensor], x: torch.Tensor, targets: torch.Tensor, *head: object
) -> torch.Tensor:
    logits = to_logits(x, *head)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE, picked - logits.logsumexp(-1), 0.0)


def _target_logprobs(
    to_logits: Callable[..., torch.Tensor],
    rows: torch.Tensor,
    targets: torch.Tensor,
    head: tuple[object, ...],
    chunk_tokens: int,
) -> torch.Tensor:
    """``log softmax(to_logits(rows))[i, targets[i]]`` per row (0 where ``targets`` is IGNORE),
    in float32 (float64 for float64 logits), ``chunk_tokens`` rows at a time under
    checkpointing."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    pieces = [
        checkpoint(
            _chunk_logprobs,
            to_logits,
            rows[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            *head,
            use_reentrant=False,
        )
        for start in range(0, rows.shape[0], chunk_tokens)
    ]
    if not pieces:
        return rows.new_zeros(0, dtype=torch.promote_types(rows.dtype, torch.float32))
    return torch.cat(pieces)


def _check_shapes(name: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
    if scores.dim() != 3 or labels.shape != scores.shape[:2]:
        raise ValueError(
            f"{name}: expected (batch, n, features) and labels (batch, n), got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def sequence_logprobs(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Per-sequence sums of ``log p(labels[:, t + 1] | ...)`` from final hidden states.

    Only the scored positions (label not :data:`IGNORE`) are gathered and projected, so prompt
    and padding positions cost nothing. The head's matmul runs in ``hidden``'s dtype, as the
    model's own head would; the softmax runs in float32 (or float64).

    Args:
        hidden: (batch, n, hidden) final hidden states (after the final norm).
        head_weight: (vocab, hidden) the LM head's weight (the embedding matrix if tied).
        labels: (batch, n) token ids, :data:`IGNORE` where not scored.
        head_bias: (vocab,) the head's bias, if it has one.
        chunk_tokens: scored positions per chunk: the peak holds a few (chunk_tokens, vocab)
            float32 buffers.

    Returns:
        (batch,) float32 (float64 for float64 inputs), differentiable with respect to
        ``hidden``, ``head_weight`` and ``head_bias``.
    """
    _check_shapes("sequence_logprobs", hidden, labels)
    targets = labels[:, 1:]
    scored = targets != IGNORE
    sequence = scored.nonzero()[:, 0]
    token_logprobs = _target_logprobs(
        _linear, hidden[:, :-1][scored], targets[scored], (head_weight, head_bias), chunk_tokens
    )
    total = token_logprobs.new_zeros(hidden.shape[0])
    return total.index_add(0, sequence, token_logprobs)


def sequence_logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """:func:`sequence_logprobs` for models whose head is not one linear layer (a LoRA-adapted
    head, logit soft-capping): from their logits, in whatever dtype the model produced them.

    The float32 copy of the logits and the softmax that backward needs exist one chunk at a
    time; the model's own logits are kept (they are the input).

    Args:
        logits: (batch, n, vocab).
        labels: (batch, n) token ids, :data:`IGNORE` where not scored.
        chunk_tokens: positions per chunk.

    Returns:
        (batch,) float32 (float64 for float64 logits), differentiable with respect to
        ``logits``.
    """
    _check_shapes("sequence_logprobs_from_logits", logits, labels)
    batch, n, vocab = logits.shape
    # Position t predicts labels[:, t + 1]; the last position predicts nothing. Shifting the
    # targets, not the logits, keeps the logits a view (no copy).
    targets = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE)], dim=1)
    token_logprobs = _target_logprobs(
        _identity, logits.reshape(batch * n, vocab), targets.flatten(), (), chunk_tokens
    )
    return token_logprobs.view(batch, n).sum(dim=1)
