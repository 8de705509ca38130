"""Typed wrappers over ``torch.ops.lorakit``: the only module that calls the native ops.

Each op also gets a fake (meta) kernel here so that ``torch.compile`` and ``FakeTensor`` can trace
it without running it. Argument checks happen in C++ (``TORCH_CHECK``) and surface as
``RuntimeError`` naming the bad argument. The fused linear cross-entropy ops live in
:mod:`lorakit.ops.fused_ce` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import lorakit._native  # noqa: F401  (loads the library that defines torch.ops.lorakit)
from lorakit import op_checks as check
from lorakit.op_checks import NF4_BLOCKSIZES as NF4_BLOCKSIZES  # re-exported for configs
from lorakit.op_checks import ceil_div as _ceil_div
from lorakit.ops import autocast  # noqa: F401  (the LoRA ops' rules under torch.autocast)
from lorakit.ops.fused_ce import fused_linear_cross_entropy as fused_linear_cross_entropy
from lorakit.ops.fused_ce import fused_linear_logprobs as fused_linear_logprobs

# ---- NF4 ---------------------------------------------------------------------------------------


def nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``w`` to 4-bit NormalFloat, byte for byte as bitsandbytes does.

    The flattened input is cut into blocks of ``blocksize`` values (the last one may be partial);
    each block is scaled by its absolute maximum and every value is replaced by the index of the
    nearest of 16 NF4 codes, two indices per byte, the first in the high nibble.

    NaN and Inf: a block holding a NaN gets absmax NaN and dequantizes to NaN throughout; a block
    holding ±Inf gets absmax Inf and dequantizes to +Inf at that position and NaN elsewhere. This
    is what bitsandbytes does; check weights with ``torch.isfinite`` first if that matters.

    Args:
        w: float32, float16 or bfloat16 tensor of any shape (empty included), any device.
        blocksize: one of 32, 64, ..., 4096.

    Returns:
        packed: uint8 of shape ``(ceil(numel / 2),)``.
        absmax: float32 of shape ``(ceil(numel / blocksize),)``.
    """
    return torch.ops.lorakit.nf4_quantize(w, blocksize)


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Expands NF4 data back to ``dtype``: ``code[index] * absmax[block]`` rounded once.

    Args:
        packed: uint8 ``(ceil(numel / 2),)`` as returned by :func:`nf4_quantize` (any shape with
            that many elements is accepted, e.g. bitsandbytes' ``(n, 1)``).
        absmax: float32 ``(ceil(numel / blocksize),)`` on the same device.
        blocksize: the blocksize used to quantize.
        shape: the shape of the result.
        dtype: float32, float16 or bfloat16.

    Returns:
        A tensor of ``shape`` and ``dtype`` on ``packed``'s device.
    """
    return torch.ops.lorakit.nf4_dequantize(packed, absmax, blocksize, list(shape), dtype)


@torch.library.register_fake("lorakit::nf4_quantize")
def _nf4_quantize_fake(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    check.float_tensor("nf4_quantize", w, "w")
    check.nf4_blocksize(blocksize)
    n = w.numel()
    packed = w.new_empty((_ceil_div(n, 2),), dtype=torch.uint8)
    absmax = w.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("lorakit::nf4_dequantize")
def _nf4_dequantize_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    check.nf4_dequantize("nf4_dequantize", packed, absmax, blocksize, shape, dtype)
    return packed.new_empty(shape, dtype=dtype)


# ---- blockwise 8-bit ---------------------------------------------------------------------------


def blockwise8_quantize(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x`` to 8 bits per value in blocks, in bitsandbytes' blockwise layout.

    Each block of ``blocksize`` values is multiplied by the reciprocal of its absolute maximum
    (rounded once to float32, as bitsandbytes' CUDA kernels do) and each value replaced by the
    index of the nearest entry of ``code`` (ties to the lower entry). A block of zeros maps
    to the entry nearest 0; a NaN makes its block's absmax NaN.

    Args:
        x: float32, float16 or bfloat16, any shape.
        code: float32 ``(256,)``, sorted ascending (e.g. :func:`lorakit.quant.dynamic_map`).
        blocksize: a power of two from 64 to 4096.

    Returns:
        q: uint8 of ``x``'s shape.
        absmax: float32 ``(ceil(numel / blocksize),)``.
    """
    return torch.ops.lorakit.blockwise8_quantize(x, code, blocksize)


def blockwise8_dequantize(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Returns ``code[q] * absmax[block]`` in ``dtype``, shaped like ``q``."""
    return torch.ops.lorakit.blockwise8_dequantize(q, absmax, code, blocksize, dtype)


@torch.library.register_fake("lorakit::blockwise8_quantize")
def _blockwise8_quantize_fake(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check.float_tensor("blockwise8_quantize", x, "x")
    check.blockwise8("blockwise8_quantize", x, None, code, blocksize)
    q = torch.empty_like(x, dtype=torch.uint8)
    return q, x.new_empty((_ceil_div(x.numel(), blocksize),), dtype=torch.float32)


@torch.library.register_fake("lorakit::blockwise8_dequantize")
def _blockwise8_dequantize_fake(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    op = "blockwise8_dequantize"
    torch._check(q.dtype == torch.uint8, lambda: f"{op}: q must be uint8, got {q.dtype}")
    check.blockwise8(op, q, absmax, code, blocksize)
    torch._check(dtype in check.FLOATS, lambda: f"{op}: dtype must be a float type, got {dtype}")
    return torch.empty_like(q, dtype=dtype)


# ---- optimizers --------------------------------------------------------------------------------

ADAMW8BIT_BLOCKSIZE = 256


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step in place, as ``torch.optim.AdamW`` computes it, in a single pass.

    ``g = grad * grad_scale``; ``param *= 1 - lr * weight_decay``; the moments are updated as
    ``m += (1 - beta1) (g - m)``, ``v = beta2 v + (1 - beta2) g^2``; then
    ``param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)``.

    Args:
        param: float32, float16 or bfloat16, contiguous; updated in place.
        grad: same dtype, shape and device as ``param``, dense and contiguous.
        exp_avg, exp_avg_sq: float32 with ``param``'s number of elements; updated in place.
        step: the number of this step, counted from 1 (bias correction).
        grad_scale: factor applied to ``grad`` first (e.g. a max-grad-norm clip coefficient).
    """
    torch.ops.lorakit.adamw_step_(
        param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, grad_scale
    )


def adamw8bit_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    exp_avg_code: torch.Tensor,
    exp_avg_sq_code: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step in place with both moments stored as blockwise 8-bit codes.

    For each block of 256 elements the moments are dequantized (``code[q] * absmax``), updated
    and used exactly as in :func:`adamw_step_`, then quantized again to the nearest code with the
    block's new absolute maximum (the layout of :func:`blockwise8_quantize` with blocksize 256).

    Args:
        param: float32, float16 or bfloat16, contiguous; updated in place.
        grad: same dtype, shape and device as ``param``.
        exp_avg, exp_avg_sq: uint8 with ``param``'s number of elements; updated in place.
        exp_avg_absmax, exp_avg_sq_absmax: float32 ``(ceil(numel / 256),)``; updated in place.
        exp_avg_code: float32 ``(256,)``, the signed dynamic map.
        exp_avg_sq_code: float32 ``(256,)``, the unsigned dynamic map.
    """
    torch.ops.lorakit.adamw8bit_step_(
        param,
        grad,
        exp_avg,
        exp_avg_absmax,
        exp_avg_sq,
        exp_avg_sq_absmax,
        exp_avg_code,
        exp_avg_sq_code,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        grad_scale,
    )


# The steps mutate their inputs in place and return nothing; the fakes only check devices, as
# the kernels do (a meta tensor among CPU ones reaches the fake kernel, not the CPU one).
@torch.library.register_fake("lorakit::adamw_step_")
def _adamw_step_fake(*args: object) -> None:
    check.one_device("adamw_step_", args)


@torch.library.register_fake("lorakit::adamw8bit_step_")
def _adamw8bit_step_fake(*args: object) -> None:
    check.one_device("adamw8bit_step_", args)


# ---- merge -------------------------------------------------------------------------------------


def lora_merge_(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> None:
    """``weight += scale · lora_b @ lora_a`` in place; ``scale = -s`` undoes a merge with ``s``.

    The product is summed in float32 and the sum rounded once to the weight's dtype, so a merge
    followed by an unmerge restores the weight to within one rounding of its dtype.

    Args:
        weight: ``(out, in)``, float32, float16 or bfloat16, contiguous; updated in place.
        lora_a: ``(r, in)``, any of those dtypes, on weight's device.
        lora_b: ``(out, r)``.
        scale: the adapter's scale (``alpha / r`` or ``alpha / sqrt(r)``), negated to unmerge.
    """
    check.finite_scale("lora_merge_", scale)
    torch.ops.lorakit.lora_merge_(weight, lora_a, lora_b, scale)


def nf4_lora_merge(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of ``W + scale · lora_b @ lora_a`` for an NF4 weight ``W``.

    Each block is expanded to float32, updated in float32 and quantized again exactly as
    :func:`nf4_quantize` quantizes a float32 tensor, so the result is bitsandbytes' NF4 of the
    merged weight (one more rounding to the 16 codes per value; see the NF4 merge drift test).

    Args:
        packed, absmax, blocksize: the weight as in :func:`nf4_dequantize` (float32 absmax).
        shape: ``(out, in)``.
        lora_a: ``(r, in)``; lora_b: ``(out, r)``; float32, float16 or bfloat16.

    Returns:
        packed: uint8 ``(ceil(out * in / 2),)``; absmax: float32 ``(ceil(out * in / blocksize),)``.
    """
    check.finite_scale("nf4_lora_merge", scale)
    return torch.ops.lorakit.nf4_lora_merge(
        packed, absmax, blocksize, list(shape), lora_a, lora_b, scale
    )


@torch.library.register_fake("lorakit::lora_merge_")
def _lora_merge_fake(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> None:
    check.float_tensor("lora_merge_", weight, "weight")
    torch._check(weight.dim() == 2, lambda: "lora_merge_: weight must be 2-D (out, in)")
    check.lora_merge("lora_merge_", weight.shape[0], weight.shape[1], weight.device, lora_a, lora_b)


@torch.library.register_fake("lorakit::nf4_lora_merge")
def _nf4_lora_merge_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "nf4_lora_merge"
    torch._check(len(shape) == 2, lambda: f"{op}: shape must be (out, in), got {shape}")
    check.nf4_dequantize(op, packed, absmax, blocksize, shape, torch.float32)
    check.lora_merge(op, shape[0], shape[1], packed.device, lora_a, lora_b)
    return packed.new_empty((packed.numel(),)), absmax.new_empty((absmax.numel(),))


# ---- LoRA linear -------------------------------------------------------------------------------


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
