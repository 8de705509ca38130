"""The frozen-plus-low-rank linear (LoRA / QLoRA), with its autograd.

Part of :mod:`lorakit.ops`, which re-exports the wrappers.
"""

from __future__ import annotations

import torch

import lorakit._native  # noqa: F401  (loads the library that defines torch.ops.lorakit)
from lorakit import op_checks as check


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """The frozen-plus-low-rank linear ``y = x Wᵀ + bias + scale · (x_lora Aᵀ) Bᵀ``.

    Differentiable in ``x``, ``bias``, ``lora_a``, ``lora_b`` and ``x_lora``; ``weight`` is frozen
    and must not require grad.

    Args:
        x: ``(..., in)``, float32, float16 or bfloat16.
        weight: ``(out, in)``, x's dtype and device.
        bias: ``(out,)`` or None.
        lora_a: ``(r, in)``; r may be 0 (no adapter).
        lora_b: ``(out, r)``.
        scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        x_lora: the low-rank path's input after LoRA dropout, shaped like x; None means x.

    Returns:
        ``(..., out)`` in x's dtype.
    """
    _check_frozen(weight, "weight")
    check.finite_scale("lora_linear", scale)
    args = (x, weight, bias, lora_a, lora_b, scale, x_lora)
    return _first_output(torch.ops.lorakit.lora_linear.default, args)


def lora_linear_nf4(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: float = 0.0,
) -> torch.Tensor:
    """:func:`lora_linear` with an NF4 base weight, never expanded in full.

    Double-quantized scales (QLoRA) are passed as they are stored: the kernels rebuild each
    block's scale ``nested_code[absmax[b]] * nested_absmax[b // 256] + nested_offset`` when they
    need it, bit for bit as :func:`blockwise8_dequantize` (blocksize 256) plus the offset.

    Args:
        packed: uint8 codes of the ``(out, in)`` weight, as from :func:`nf4_quantize`
            (``out`` is ``lora_b``'s row count, ``in`` is x's last size).
        absmax: float32 block scales ``(ceil(out * in / blocksize),)``, or their uint8 codes when
            ``nested_absmax`` and ``nested_code`` are given.
        blocksize: the blocksize it was quantized with.
        nested_absmax: float32 ``(ceil(absmax.numel() / 256),)``, or None.
        nested_code: float32 ``(256,)``, the map the scales were quantized with, or None.
        nested_offset: added to every rebuilt scale (the scales' mean, taken out before quantizing).
        Others as in :func:`lora_linear`; the weight is expanded to x's dtype.

    Returns:
        ``(..., out)`` in x's dtype.
    """
    check.finite_scale("lora_linear_nf4", scale)
    args = (x, packed, absmax, blocksize, bias, lora_a, lora_b, scale, x_lora)
    nested = (nested_absmax, nested_code, nested_offset)
    return _first_output(torch.ops.lorakit.lora_linear_nf4.default, (*args, *nested))


def _first_output(op: torch._ops.OpOverload, args: tuple[object, ...]) -> torch.Tensor:
    """``op(*args)[0]``, called straight below autograd when autograd would record nothing.

    The Python autograd kernel registered at the end of this module would otherwise box every
    argument from C++ to Python and back only to find that (the test is torch's own), about 12 us
    a call on this project's CPU, 3% of a 1-row decode step of a 2048 x 2048 layer. A graph being
    compiled takes the registered path, which it traces.
    """
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
    ):
        return op(*args)[0]
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)[0]


def _check_frozen(t: torch.Tensor, name: str) -> None:
    if t.requires_grad:
        raise ValueError(
            f"lora_linear: {name} must be frozen (requires_grad=False); only the adapter trains"
        )


def _lora_fake_outputs(
    x: torch.Tensor, out: int | torch.SymInt, rank: int | torch.SymInt
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((*x.shape[:-1], out)), x.new_empty((*x.shape[:-1], rank))


def _lora_fake_grads(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_xa = x.new_empty((*x.shape[:-1], lora_a.shape[0]))
    return torch.empty_like(x), grad_xa, torch.empty_like(lora_a), torch.empty_like(lora_b)


@torch.library.register_fake("lorakit::lora_linear")
def _lora_linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check.dense_weight("lora_linear", x, weight)
    check.adapter("lora_linear", x, weight.shape[0], bias, lora_a, lora_b, x_lora)
    check.finite_scale("lora_linear", scale)
    return _lora_fake_outputs(x, weight.shape[0], lora_a.shape[0])


@torch.library.register_fake("lorakit::lora_linear_nf4")
def _lora_linear_nf4_fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    op, out = "lora_linear_nf4", lora_b.shape[0]
    check.adapter(op, x, out, bias, lora_a, lora_b, x_lora)
    check.nf4_weight(op, x, packed, absmax, blocksize, out, nested_absmax, nested_code)
    check.finite_scale(op, scale)
    return _lora_fake_outputs(x, out, lora_a.shape[0])


@torch.library.register_fake("lorakit::lora_linear_backward")
def _lora_linear_backward_fake(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "lora_linear_backward"
    check.dense_weight(op, x, weight)
    check.adapter(op, x, weight.shape[0], None, lora_a, lora_b, x_lora)
    check.grad_y(op, grad_y, x, weight.shape[0])
    return _lora_fake_grads(x, lora_a, lora_b)


@torch.library.register_fake("lorakit::lora_linear_nf4_backward")
def _lora_linear_nf4_backward_fake(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op, out = "lora_linear_nf4_backward", lora_b.shape[0]
    check.adapter(op, x, out, None, lora_a, lora_b, x_lora)
    check.nf4_weight(op, x, packed, absmax, blocksize, out, nested_absmax, nested_code)
    check.grad_y(op, grad_y, x, out)
    return _lora_fake_grads(x, lora_a, lora_b)


# Autograd: the forward returns xa = x_lora Aᵀ, saved for grad B; W is frozen (no gradient).
# With dropout, x_lora is a separate input and its gradient is grad_xa A (dropout's own backward
# then masks it); without, the op folds that term into grad_x.


def _lora_grads(
    grad_y: torch.Tensor, grads: tuple[torch.Tensor, ...], lora_a: torch.Tensor, dropout: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    grad_x, grad_xa, grad_a, grad_b = grads
    return grad_x, grad_a, grad_b, grad_xa @ lora_a if dropout else None


def _bias_grad(
    ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor, index: int
) -> torch.Tensor | None:
    return grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[index] else None


def _lora_linear_setup(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[object, ...],
    output: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, weight, _bias, lora_a, lora_b, scale, x_lora = inputs
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], x_lora)


def _lora_linear_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor, _grad_xa: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    x, weight, lora_a, lora_b, xa, x_lora = ctx.saved_tensors
    grads = torch.ops.lorakit.lora_linear_backward(
        grad_y, x, weight, lora_a, lora_b, xa, ctx.scale, x_lora
    )
    grad_x, grad_a, grad_b, grad_x_lora = _lora_grads(grad_y, grads, lora_a, x_lora is not None)
    return grad_x, None, _bias_grad(ctx, grad_y, 2), grad_a, grad_b, None, grad_x_lora


def _lora_linear_nf4_setup(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[object, ...],
    output: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, packed, absmax, blocksize, _bias, lora_a, lora_b, scale, x_lora, *nested = inputs
    nested_absmax, nested_code, ctx.nested_offset = nested
    ctx.scale, ctx.blocksize = scale, blocksize
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(
        x, packed, absmax, lora_a, lora_b, output[1], x_lora, nested_absmax, nested_code
    )


def _lora_linear_nf4_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor, _grad_xa: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    x, packed, absmax, lora_a, lora_b, xa, x_lora, nested_absmax, nested_code = ctx.saved_tensors
    grads = torch.ops.lorakit.lora_linear_nf4_backward(
        grad_y,
        x,
        packed,
        absmax,
        ctx.blocksize,
        lora_a,
        lora_b,
        xa,
        ctx.scale,
        x_lora,
        nested_absmax,
        nested_code,
        ctx.nested_offset,
    )
    grad_x, grad_a, grad_b, grad_x_lora = _lora_grads(grad_y, grads, lora_a, x_lora is not None)
    bias = _bias_grad(ctx, grad_y, 4)
    return grad_x, None, None, None, bias, grad_a, grad_b, None, grad_x_lora, None, None, None


torch.library.register_autograd(
    "lorakit::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup
)
torch.library.register_autograd(
    "lorakit::lora_linear_nf4", _lora_linear_nf4_backward, setup_context=_lora_linear_nf4_setup
)
