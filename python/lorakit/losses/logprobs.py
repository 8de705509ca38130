r"""Summed log-probabilities of labelled tokens, one chunk of tokens' logits at a time.

For a sequence with labels :math:`y` (``IGNORE`` where not scored), the summed log-probability is

.. math::

    \log \pi(y) = \sum_{t:\, y_{t+1} \ne \mathrm{IGNORE}} \big(z_{t, y_{t+1}} - \log\textstyle\sum_v
    e^{z_{t,v}}\big), \qquad z_t = W h_t + b .

The float32 logits of a whole batch, (tokens, vocab), are what dominates the memory of DPO and
of SFT with a large vocabulary (at 128K tokens, 512 MiB per thousand tokens). From hidden states,
each chunk of ``chunk_tokens`` positions runs under activation checkpointing (non-reentrant),
which keeps only the chunk's inputs for backward and recomputes its logits there: one chunk's
logits exist at a time, in the forward pass and in the backward pass. The log-softmax of a chunk
keeps only its log-normaliser per row and writes its gradient in place,

.. math::

    \frac{\partial \log p_y}{\partial z_v} = \mathbb{1}[v = y] - \operatorname{softmax}(z)_v,

so a chunk's backward needs one float32 buffer beside its logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from lorakit import ops
from lorakit.data.encode import IGNORE

# 512 positions x 128K vocabulary x 4 bytes = 256 MiB per float32 buffer of one chunk; the
# matmul of one chunk (512 x hidden x vocab) is still large enough to run at full speed.
DEFAULT_CHUNK_TOKENS = 512


class _TargetLogprobs(torch.autograd.Function):
    """``log_softmax(logits)[i, targets[i]]`` per row (0 where ``targets[i]`` is IGNORE), in
    float32 (float64 for float64 logits), ``chunk_tokens`` rows at a time in forward and
    backward."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        index = targets.clamp(min=0).unsqueeze(-1)
        lse = logits.new_empty(targets.shape, dtype=dtype)
        picked = logits.new_empty(targets.shape, dtype=dtype)
        for start in range(0, len(targets), chunk_tokens):
            z = logits[start : start + chunk_tokens].to(dtype)
            torch.logsumexp(z, dim=-1, out=lse[start : start + chunk_tokens])
            picked[start : start + chunk_tokens] = z.gather(
                -1, index[start : start + chunk_tokens]
            )[:, 0]
        scored = targets != IGNORE
        ctx.save_for_backward(logits, index, scored, lse)
        ctx.chunk_tokens = chunk_tokens
        return torch.where(scored, picked - lse, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, index, scored, lse = ctx.saved_tensors
        g = torch.where(scored, grad_out, 0.0).unsqueeze(-1)

        def chunk_grad(start: int, stop: int) -> torch.Tensor:
            softmax = (logits[start:stop].to(lse.dtype) - lse[start:stop, None]).exp_()
            grad = softmax.mul_(-g[start:stop]).scatter_add_(-1, index[start:stop], g[start:stop])
            return grad.to(logits.dtype)

        rows, chunk_tokens = len(index), ctx.chunk_tokens
        if rows <= chunk_tokens:
            return chunk_grad(0, rows), None, None
        grad = torch.empty_like(logits)
        for start in range(0, rows, chunk_tokens):
            grad[start : start + chunk_tokens] = chunk_grad(start, start + chunk_tokens)
        return grad, None, None


def _check_chunk(chunk_tokens: int) -> None:
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")


def _head_logprobs(
    x: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float = 0.0,
) -> torch.Tensor:
    logits = F.linear(x, weight, bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    # One chunk: the whole of x (at least 1, for the empty chunk of a batch that scores nothing).
    return _TargetLogprobs.apply(logits, targets, max(len(targets), 1))


def fusable(hidden: torch.Tensor, head_bias: torch.Tensor | None) -> bool:
    """Whether lorakit's fused op computes these log-probs: a head without bias, and a dtype it
    takes (float64 references keep the chunked path)."""
    return head_bias is None and hidden.dtype in (torch.float32, torch.float16, torch.bfloat16)


def head_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden`` and the head's ``weight`` in the dtype the head's ``F.linear`` would compute
    in: the autocast dtype where autocast is on, else the weight's."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return hidden.to(dtype), weight.to(dtype)


def scored_rows(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions that predict a scored label: their hidden states (rows, hidden), their
    targets (rows,) and their batch row (rows,)."""
    targets = labels[:, 1:]
    scored = targets != IGNORE
    return hidden[:, :-1][scored], targets[scored], scored.nonzero()[:, 0]


def _check_shapes(name: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
    if scores.dim() != 3 or labels.shape != scores.shape[:2]:
        raise ValueError(
            f"{name}: expected (batch, n, features) and labels (batch, n), got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )


def sequence_logprobs(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    fused: bool = True,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Per-sequence sums of ``log p(labels[:, t + 1] | ...)`` from final hidden states.

    Only the scored positions (label not :data:`IGNORE`) are gathered and projected, so prompt
    and padding positions cost nothing. The head's matmul runs in the dtype the model's own head
    would use; the softmax runs in float32 (or float64). With ``fused`` (and no head bias) lorakit's
    native op (:func:`lorakit.ops.fused_linear_logprobs`) computes the log-probs and their
    gradient in one pass per chunk; otherwise each chunk runs under activation checkpointing.

    Args:
        hidden: (batch, n, hidden) final hidden states (after the final norm).
        head_weight: (vocab, hidden) the LM head's weight (the embedding matrix if tied).
        labels: (batch, n) token ids, :data:`IGNORE` where not scored.
        head_bias: (vocab,) the head's bias, if it has one.
        chunk_tokens: scored positions per chunk: the peak holds a few (chunk_tokens, vocab)
            float32 buffers.
        fused: use the native fused op where it applies.
        softcap: the model's final logit soft-capping ``c * tanh(z / c)`` (Gemma 2); 0: none.

    Returns:
        (batch,) float32 (float64 for float64 inputs), differentiable with respect to
        ``hidden``, ``head_weight`` and ``head_bias``.
    """
    _check_shapes("sequence_logprobs", hidden, labels)
    _check_chunk(chunk_tokens)
    rows, row_targets, row_of = scored_rows(hidden, labels)
    if fused and fusable(hidden, head_bias):
        x, weight = head_operands(rows, head_weight)
        token_logprobs = ops.fused_linear_logprobs(x, weight, row_targets, chunk_tokens, softcap)
    else:
        # split, not slicing: its backward concatenates the chunks' gradients once, where each
        # slice's backward would allocate a zero gradient of all the rows.
        token_logprobs = torch.cat(
            [
                checkpoint(
                    _head_logprobs, x, t, head_weight, head_bias, softcap, use_reentrant=False
                )
                for x, t in zip(
                    rows.split(chunk_tokens), row_targets.split(chunk_tokens), strict=True
                )
            ]
        )
    total = token_logprobs.new_zeros(hidden.shape[0])
    return total.index_add(0, row_of, token_logprobs)


def token_logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Per-token ``log p(labels[:, t] | labels[:, :t])`` from a model's logits, aligned with
    ``labels`` (position 0, which nothing predicts, and :data:`IGNORE` labels give 0): the
    log-probs of sampled completion tokens that PPO and GRPO compare between policies.

    Memory as :func:`sequence_logprobs_from_logits` (no float32 copy of the logits, no softmax
    kept for backward).

    Args:
        logits: (batch, n, vocab); ``logits[:, t]`` predicts ``labels[:, t + 1]``.
        labels: (batch, n) token ids, :data:`IGNORE` where not scored.
        chunk_tokens: positions per chunk.

    Returns:
        (batch, n) float32 (float64 for float64 logits), differentiable with respect to
        ``logits``.
    """
    _check_shapes("token_logprobs_from_logits", logits, labels)
    _check_chunk(chunk_tokens)
    batch, n, vocab = logits.shape
    # Position t predicts labels[:, t + 1]; the last position predicts nothing. Shifting the
    # targets, not the logits, keeps the logits a view (no copy).
    targets = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE)], dim=1)
    predicted = _TargetLogprobs.apply(
        logits.reshape(batch * n, vocab), targets.flatten(), chunk_tokens
    ).view(batch, n)
    return F.pad(predicted[:, :-1], (1, 0))


def sequence_logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """:func:`sequence_logprobs` for models whose head is not one linear layer (a LoRA-adapted
    head, logit soft-capping): from their logits, in whatever dtype the model produced them.

    No float32 copy of the logits and no softmax is kept for backward (only a log-normaliser per
    position); backward writes the logits' gradient chunk by chunk. The model's own logits and
    their gradient, which the model's backward needs, are whole.

    Args:
        logits: (batch, n, vocab).
        labels: (batch, n) token ids, :data:`IGNORE` where not scored.
        chunk_tokens: positions per chunk.

    Returns:
        (batch,) float32 (float64 for float64 logits), differentiable with respect to
        ``logits``.
    """
    return token_logprobs_from_logits(logits, labels, chunk_tokens).sum(dim=1)
