r"""Fused linear cross-entropy and log-probs (``torch.ops.lorakit.fused_linear_*``): part of
:mod:`lorakit.ops`, which re-exports the wrappers.

For hidden states :math:`h_t`, an LM head :math:`W` and labels :math:`y_t` the ops return

.. math::

    \log p_t = z_{t, y_t} - \log\textstyle\sum_v e^{z_{t,v}}, \qquad z_t = W h_t
    \ (\text{or } c \tanh(W h_t / c) \text{ with soft-capping } c),

or the summed cross-entropy :math:`-\sum_t \log p_t` over tokens whose label is not -100, forming
the logits one chunk of tokens at a time. Each chunk's gradient
:math:`\partial(-\log p_t)/\partial z_t = \operatorname{softmax}(z_t) - e_{y_t}` is turned into the
hidden states' (``g W``) and the head's (``gᵀ h``) gradient in the same pass, so the whole
(tokens, vocab) logits never exist; backward only scales what the forward stored (Liger-Kernel's
fused linear cross-entropy does the same). Per-token log-probs with a trained head take a second
pass in backward (the head's gradient depends on the incoming per-token gradient).
"""

from __future__ import annotations

import torch

import lorakit._native  # noqa: F401  (loads the library that defines torch.ops.lorakit)
from lorakit import op_checks as check

IGNORE_INDEX = -100


def _wants_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, reduction="sum")`` (ignore index -100) without
    the whole logits: one chunk of ``chunk_tokens`` tokens' logits exists at a time.

    Differentiable in ``hidden`` and ``weight``; the gradients are computed in the forward pass
    (only for the tensors that require grad), so backward is a multiplication.

    Args:
        hidden: ``(tokens, hidden)`` float32, float16 or bfloat16.
        weight: ``(vocab, hidden)``, hidden's dtype and device (the LM head, or the tied
            embedding).
        labels: int64 ``(tokens,)`` in ``[0, vocab)``, or -100 for tokens not trained on.
        chunk_tokens: tokens per chunk; 0 chooses by memory: a quarter of the tokens (or more
            where the hidden states outweigh that many logits), at most 512 MiB of logits.
        softcap: ``c > 0`` replaces the logits by ``c * tanh(logits / c)`` (Gemma 2); 0: none.

    Returns:
        A 0-d float32 tensor: the summed cross-entropy over the trained tokens.
    """
    loss, _, _ = torch.ops.lorakit.fused_linear_cross_entropy(
        hidden, weight, labels, _wants_grad(hidden), _wants_grad(weight), chunk_tokens, softcap
    )
    return loss


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Per-token ``log_softmax(hidden @ weight.T)[t, labels[t]]`` (0 where the label is -100),
    one chunk of tokens' logits at a time: the log-probs DPO and PPO compare.

    With a frozen head the forward also stores each token's ``d logp_t / d hidden_t`` (one
    ``(tokens, hidden)`` tensor) and backward scales it; when the head trains, backward runs a
    second chunked pass.

    Args:
        As :func:`fused_linear_cross_entropy`.

    Returns:
        ``(tokens,)`` float32, differentiable in ``hidden`` and ``weight``.
    """
    unit = _wants_grad(hidden) and not _wants_grad(weight)
    logprobs, _ = torch.ops.lorakit.fused_linear_logprobs(
        hidden, weight, labels, unit, chunk_tokens, softcap
    )
    return logprobs


# ---- fake kernels -------------------------------------------------------------------------------


@torch.library.register_fake("lorakit::fused_linear_cross_entropy")
def _cross_entropy_fake(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_hidden: bool,
    grad_weight: bool,
    chunk_tokens: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check.fused_ce("fused_linear_cross_entropy", hidden, weight, labels, chunk_tokens, softcap)
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, *_fake_grads(hidden, weight, grad_hidden, grad_weight)


@torch.library.register_fake("lorakit::fused_linear_logprobs")
def _logprobs_fake(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_hidden: bool,
    chunk_tokens: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    check.fused_ce("fused_linear_logprobs", hidden, weight, labels, chunk_tokens, softcap)
    logprobs = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
    return logprobs, _fake_grads(hidden, weight, grad_hidden, False)[0]


@torch.library.register_fake("lorakit::fused_linear_logprobs_backward")
def _logprobs_backward_fake(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_hidden: bool,
    grad_weight: bool,
    chunk_tokens: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "fused_linear_logprobs_backward"
    check.fused_ce(op, hidden, weight, labels, chunk_tokens, softcap)
    check.row_grad(op, grad, hidden)
    return _fake_grads(hidden, weight, grad_hidden, grad_weight)


def _fake_grads(
    hidden: torch.Tensor, weight: torch.Tensor, grad_hidden: bool, grad_weight: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    size = hidden.shape[1]
    gh = hidden.new_empty((hidden.shape[0] if grad_hidden else 0, size))
    gw = hidden.new_empty((weight.shape[0] if grad_weight else 0, size), dtype=torch.float32)
    return gh, gw


# ---- autograd -----------------------------------------------------------------------------------


def _asked(ctx: torch.autograd.function.FunctionCtx, index: int, flag: bool, name: str) -> bool:
    if ctx.needs_input_grad[index] and not flag:
        raise RuntimeError(
            f"fused linear cross-entropy: {name} needs a gradient but the op was called with "
            f"grad_{name}=False (call it through lorakit.ops, which sets the flags)"
        )
    return ctx.needs_input_grad[index]


def _cross_entropy_setup(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[object, ...],
    output: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    _, weight, _, ctx.grad_hidden, ctx.grad_weight, _, _ = inputs
    ctx.weight_dtype = weight.dtype
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


def _cross_entropy_backward(
    ctx: torch.autograd.function.FunctionCtx,
    grad_loss: torch.Tensor,
    _gh: torch.Tensor,
    _gw: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    gh, gw = ctx.saved_tensors
    grad_hidden = gh * grad_loss if _asked(ctx, 0, ctx.grad_hidden, "hidden") else None
    grad_weight = None
    if _asked(ctx, 1, ctx.grad_weight, "weight"):
        grad_weight = (gw * grad_loss).to(ctx.weight_dtype)
    return grad_hidden, grad_weight, None, None, None, None, None


def _logprobs_setup(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[object, ...],
    output: tuple[torch.Tensor, torch.Tensor],
) -> None:
    hidden, weight, labels, ctx.unit, ctx.chunk_tokens, ctx.softcap = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden, weight, labels, output[1])


def _logprobs_backward(
    ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _unit: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    hidden, weight, labels, unit = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad = grad.float().contiguous()
    if ctx.unit and not need_weight:
        return (unit.float() * grad[:, None]).to(unit.dtype), None, None, None, None, None
    grad_hidden, grad_weight = torch.ops.lorakit.fused_linear_logprobs_backward(
        grad, hidden, weight, labels, need_hidden, need_weight, ctx.chunk_tokens, ctx.softcap
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight.to(weight.dtype) if need_weight else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "lorakit::fused_linear_cross_entropy",
    _cross_entropy_backward,
    setup_context=_cross_entropy_setup,
)
torch.library.register_autograd(
    "lorakit::fused_linear_logprobs", _logprobs_backward, setup_context=_logprobs_setup
)
