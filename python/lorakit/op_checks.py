"""The argument checks of the native ops, for their fake (meta) kernels in :mod:`lorakit.ops`.

The C++ kernels check their inputs with ``TORCH_CHECK`` (``csrc/*/..._checks.cpp``,
``csrc/lora/lora_common.cpp``); a fake kernel must refuse the same inputs, or ``torch.compile``
traces a call that fails (or, worse, a meta tensor among CPU ones reaches the fake kernel
instead of the CPU one and returns an uninitialised tensor). ``torch._check`` works on symbolic
sizes too, and raises RuntimeError as ``TORCH_CHECK`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK = 256  # scales per block of double-quantized NF4 scales (kNestedShift in C++)


def ceil_div(a: int | torch.SymInt, b: int) -> int | torch.SymInt:
    return (a + b - 1) // b


def finite_scale(op: str, scale: float) -> None:
    """A NaN or infinite scale gives NaN or garbage, differently on different kernel paths."""
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def one_device(op: str, tensors: Sequence[object]) -> None:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    torch._check(len(devices) <= 1, lambda: f"{op}: tensors on several devices: {devices}")


def float_tensor(op: str, t: torch.Tensor, name: str) -> None:
    torch._check(
        t.dtype in FLOATS, lambda: f"{op}: {name} must be float32, float16 or bfloat16: {t.dtype}"
    )


def _dtype(op: str, t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    torch._check(t.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {t.dtype}")


def nf4_blocksize(blocksize: int) -> None:
    torch._check(blocksize in NF4_BLOCKSIZES, lambda: f"unsupported blocksize {blocksize}")


def nf4_dequantize(
    op: str,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> None:
    nf4_blocksize(blocksize)
    _dtype(op, packed, "packed", torch.uint8)
    _dtype(op, absmax, "absmax", torch.float32)
    one_device(op, [packed, absmax])
    torch._check(dtype in FLOATS, lambda: f"{op}: dtype must be a float type, got {dtype}")
    numel = math.prod(shape)
    torch._check(all(d >= 0 for d in shape), lambda: f"{op}: shape has a negative size {shape}")
    torch._check(packed.numel() == ceil_div(numel, 2), lambda: f"{op}: packed/shape mismatch")
    torch._check(
        absmax.numel() == ceil_div(numel, blocksize), lambda: f"{op}: absmax/shape mismatch"
    )


def blockwise8(
    op: str, values: torch.Tensor, absmax: torch.Tensor | None, code: torch.Tensor, blocksize: int
) -> None:
    _dtype(op, code, "code", torch.float32)
    torch._check(code.numel() == 256 and code.dim() == 1, lambda: f"{op}: code must hold 256")
    torch._check(
        64 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0,
        lambda: f"{op}: blocksize must be a power of two from 64 to 4096, got {blocksize}",
    )
    one_device(op, [values, absmax, code])
    if absmax is not None:
        _dtype(op, absmax, "absmax", torch.float32)
        torch._check(
            absmax.numel() == ceil_div(values.numel(), blocksize),
            lambda: f"{op}: absmax has {absmax.numel()} scales for {values.numel()} values",
        )


def adapter(
    op: str,
    x: torch.Tensor,
    out: int | torch.SymInt,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    x_lora: torch.Tensor | None,
) -> None:
    """``check_adapter_args`` of csrc/lora/lora_common.cpp."""
    float_tensor(op, x, "x")
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have shape (..., in), got a scalar")
    torch._check(
        lora_a.dim() == 2 and lora_a.shape[1] == x.shape[-1],
        lambda: f"{op}: lora_a must be (r, in), got {tuple(lora_a.shape)}",
    )
    torch._check(
        lora_b.dim() == 2 and lora_b.shape[0] == out and lora_b.shape[1] == lora_a.shape[0],
        lambda: f"{op}: lora_b must be (out, r), got {tuple(lora_b.shape)}",
    )
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == out, lambda: f"{op}: bias must be (out,)")
    if x_lora is not None:
        torch._check(x_lora.shape == x.shape, lambda: f"{op}: x_lora must have x's shape")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias), ("x_lora", x_lora)):
        if t is not None:
            _matches_x(op, name, t, x)


def _matches_x(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    torch._check(t.dtype == x.dtype, lambda: f"{op}: {name} is {t.dtype} but x is {x.dtype}")
    torch._check(
        t.device == x.device, lambda: f"{op}: {name} is on device {t.device}, x on {x.device}"
    )


def dense_weight(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be (out, in)")
    torch._check(weight.shape[1] == x.shape[-1], lambda: f"{op}: weight and x do not fit")
    torch._check(weight.dtype == x.dtype, lambda: f"{op}: weight is {weight.dtype}, x {x.dtype}")
    torch._check(
        weight.device == x.device, lambda: f"{op}: weight is on device {weight.device}, x not"
    )


def nf4_weight(
    op: str,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    out: int | torch.SymInt,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
) -> None:
    """``check_nf4_weight`` of csrc/lora/lora_common.cpp."""
    nf4_blocksize(blocksize)
    _dtype(op, packed, "packed", torch.uint8)
    one_device(op, [x, packed, absmax, nested_absmax, nested_code])
    numel = out * x.shape[-1]
    torch._check(packed.numel() == ceil_div(numel, 2), lambda: f"{op}: packed does not fit")
    blocks = ceil_div(numel, blocksize)
    torch._check(absmax.numel() == blocks, lambda: f"{op}: absmax does not fit the weight")
    torch._check(
        (nested_absmax is None) == (nested_code is None),
        lambda: f"{op}: pass nested_absmax and nested_code together or neither",
    )
    if nested_absmax is None or nested_code is None:
        _dtype(op, absmax, "absmax", torch.float32)
        return
    _dtype(op, absmax, "absmax", torch.uint8)
    _dtype(op, nested_absmax, "nested_absmax", torch.float32)
    _dtype(op, nested_code, "nested_code", torch.float32)
    torch._check(nested_code.numel() == 256, lambda: f"{op}: nested_code must hold 256 values")
    torch._check(
        nested_absmax.numel() == ceil_div(blocks, NESTED_BLOCK),
        lambda: f"{op}: nested_absmax does not fit absmax",
    )


def grad_y(op: str, grad: torch.Tensor, x: torch.Tensor, out: int | torch.SymInt) -> None:
    rows = math.prod(x.shape[:-1])
    torch._check(
        grad.dim() >= 1 and grad.shape[-1] == out and grad.numel() == rows * out,
        lambda: f"{op}: grad_y must have shape (..., {out})",
    )


def lora_merge(
    op: str,
    out: int | torch.SymInt,
    in_features: int | torch.SymInt,
    device: torch.device,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
) -> None:
    """``check_adapter`` of csrc/merge/merge_checks.cpp."""
    float_tensor(op, lora_a, "lora_a")
    float_tensor(op, lora_b, "lora_b")
    torch._check(lora_a.dim() == 2 and lora_b.dim() == 2, lambda: f"{op}: lora_a/b must be 2-D")
    torch._check(
        lora_a.shape[1] == in_features
        and lora_b.shape[0] == out
        and lora_b.shape[1] == lora_a.shape[0],
        lambda: f"{op}: lora_a and lora_b do not fit a weight of shape [{out}, {in_features}]",
    )
    torch._check(
        lora_a.device == device and lora_b.device == device,
        lambda: f"{op}: lora_a and lora_b must be on the weight's device {device}",
    )


def fused_ce(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    softcap: float,
) -> None:
    """``check_args`` of csrc/fused_ce/fused_ce_common.cpp, less the labels' range (values)."""
    float_tensor(op, hidden, "hidden")
    torch._check(
        weight.dtype == hidden.dtype,
        lambda: f"{op}: weight is {weight.dtype} but hidden is {hidden.dtype}",
    )
    torch._check(
        hidden.dim() == 2 and weight.dim() == 2,
        lambda: (
            f"{op}: hidden must be (tokens, hidden) and weight (vocab, hidden), got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        ),
    )
    torch._check(hidden.shape[1] == weight.shape[1], lambda: f"{op}: hidden sizes differ")
    torch._check(weight.shape[0] > 0, lambda: f"{op}: weight has no rows (an empty vocabulary)")
    _dtype(op, labels, "labels", torch.int64)
    torch._check(
        labels.dim() == 1 and labels.shape[0] == hidden.shape[0],
        lambda: f"{op}: labels must be (tokens,), got {tuple(labels.shape)}",
    )
    one_device(op, [hidden, weight, labels])
    torch._check(chunk_tokens >= 0, lambda: f"{op}: chunk_tokens must be >= 0")
    torch._check(
        math.isfinite(softcap) and softcap >= 0, lambda: f"{op}: softcap must be finite and >= 0"
    )


def row_grad(op: str, grad: torch.Tensor, hidden: torch.Tensor) -> None:
    _dtype(op, grad, "grad", torch.float32)
    torch._check(
        grad.dim() == 1 and grad.shape[0] == hidden.shape[0],
        lambda: f"{op}: grad must be (tokens,), got {tuple(grad.shape)}",
    )
    one_device(op, [grad, hidden])
