"""Bad arguments to the native ops: the fake (meta) kernels refuse what the C++ kernels refuse,
a meta tensor among CPU ones is refused instead of giving an uninitialised result, and a
non-finite LoRA scale is refused rather than giving NaN on some kernel paths and not others."""

import math

import pytest
import torch

from lorakit import ops
from lorakit.quant import dynamic_map

OUT, IN, R = 8, 16, 2


def dense_args(device, **change):
    """Valid ``lora_linear`` arguments (x of 3 rows) on ``device``, with ``change`` applied."""
    args = {
        "x": torch.randn(3, IN),
        "weight": torch.randn(OUT, IN),
        "bias": torch.randn(OUT),
        "lora_a": torch.randn(R, IN),
        "lora_b": torch.randn(OUT, R),
        "scale": 2.0,
        "x_lora": None,
    }
    args.update(change)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def nf4_args(device, **change):
    packed, absmax = ops.nf4_quantize(torch.randn(OUT, IN), 64)
    args = {
        "x": torch.randn(3, IN),
        "packed": packed,
        "absmax": absmax,
        "blocksize": 64,
        "bias": None,
        "lora_a": torch.randn(R, IN),
        "lora_b": torch.randn(OUT, R),
        "scale": 2.0,
    }
    args.update(change)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


# Each case: a call of one op on arguments made on a given device; every one is invalid.
BAD_CALLS = {
    "lora_a (r, in) of another in": lambda d: ops.lora_linear(
        **dense_args(d, lora_a=torch.randn(R, IN + 1))
    ),
    "lora_b of another out": lambda d: ops.lora_linear(
        **dense_args(d, lora_b=torch.randn(OUT + 1, R))
    ),
    "lora_b of another rank": lambda d: ops.lora_linear(
        **dense_args(d, lora_b=torch.randn(OUT, R + 1))
    ),
    "bias of another size": lambda d: ops.lora_linear(**dense_args(d, bias=torch.randn(OUT + 1))),
    "weight of another in": lambda d: ops.lora_linear(
        **dense_args(d, weight=torch.randn(OUT, IN + 1))
    ),
    "lora_a in float16, x in float32": lambda d: ops.lora_linear(
        **dense_args(d, lora_a=torch.randn(R, IN).half())
    ),
    "x_lora of another shape": lambda d: ops.lora_linear(
        **dense_args(d, x_lora=torch.randn(4, IN))
    ),
    "integer x": lambda d: ops.lora_linear(
        **dense_args(
            d,
            x=torch.ones(3, IN, dtype=torch.int32),
            weight=torch.ones(OUT, IN, dtype=torch.int32),
            bias=None,
            lora_a=torch.ones(R, IN, dtype=torch.int32),
            lora_b=torch.ones(OUT, R, dtype=torch.int32),
        )
    ),
    "nf4: packed too short": lambda d: ops.lora_linear_nf4(
        **nf4_args(d, packed=torch.zeros(OUT * IN // 2 - 1, dtype=torch.uint8))
    ),
    "nf4: absmax too short": lambda d: ops.lora_linear_nf4(**nf4_args(d, absmax=torch.ones(1))),
    "nf4: blocksize 48": lambda d: ops.lora_linear_nf4(**nf4_args(d, blocksize=48)),
    "nf4: packed not uint8": lambda d: ops.lora_linear_nf4(
        **nf4_args(d, packed=torch.zeros(OUT * IN // 2))
    ),
    "nf4_dequantize: absmax too short": lambda d: ops.nf4_dequantize(
        torch.zeros(OUT * IN // 2, dtype=torch.uint8, device=d),
        torch.ones(1, device=d),
        64,
        (OUT, IN),
        torch.float32,
    ),
    "nf4_dequantize: integer dtype": lambda d: ops.nf4_dequantize(
        torch.zeros(OUT * IN // 2, dtype=torch.uint8, device=d),
        torch.ones(2, device=d),
        64,
        (OUT, IN),
        torch.int32,
    ),
    "nf4_quantize: integer w": lambda d: ops.nf4_quantize(
        torch.ones(4, 4, dtype=torch.int32, device=d)
    ),
    "blockwise8_dequantize: code of 255": lambda d: ops.blockwise8_dequantize(
        torch.zeros(256, dtype=torch.uint8, device=d),
        torch.ones(1, device=d),
        torch.linspace(-1, 1, 255, device=d),
        256,
    ),
    "blockwise8_dequantize: absmax too short": lambda d: ops.blockwise8_dequantize(
        torch.zeros(512, dtype=torch.uint8, device=d),
        torch.ones(1, device=d),
        dynamic_map(True, d),
        256,
    ),
    "blockwise8_quantize: blocksize 100": lambda d: ops.blockwise8_quantize(
        torch.randn(256, device=d), dynamic_map(True, d), 100
    ),
    "lora_merge_: lora_a of another in": lambda d: ops.lora_merge_(
        torch.randn(OUT, IN, device=d),
        torch.randn(R, IN + 1, device=d),
        torch.randn(OUT, R, device=d),
        1.0,
    ),
    "nf4_lora_merge: lora_b of another out": lambda d: ops.nf4_lora_merge(
        *ops.nf4_quantize(torch.randn(OUT, IN, device=d), 64),
        64,
        (OUT, IN),
        torch.randn(R, IN, device=d),
        torch.randn(OUT + 1, R, device=d),
        1.0,
    ),
    "lora_linear_backward: grad_y of another out": lambda d: torch.ops.lorakit.lora_linear_backward(
        torch.randn(3, OUT + 1, device=d),
        torch.randn(3, IN, device=d),
        torch.randn(OUT, IN, device=d),
        torch.randn(R, IN, device=d),
        torch.randn(OUT, R, device=d),
        torch.randn(3, R, device=d),
        1.0,
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_the_fake_kernel_refuses_what_the_cpu_kernel_refuses(case) -> None:
    call = BAD_CALLS[case]
    with pytest.raises(RuntimeError):
        call("cpu")
    with pytest.raises(RuntimeError):  # meta tensors reach the fake kernels
        call("meta")


def test_valid_calls_pass_the_fake_kernels() -> None:
    # The cases above must fail for their one change, not because the base arguments are bad.
    y = ops.lora_linear(**dense_args("meta"))
    assert y.shape == (3, OUT) and y.device.type == "meta"
    y = ops.lora_linear_nf4(**nf4_args("meta"))
    assert y.shape == (3, OUT)
    ops.lora_merge_(
        torch.empty(OUT, IN, device="meta"),
        torch.empty(R, IN, device="meta"),
        torch.empty(OUT, R, device="meta"),
        1.0,
    )


def test_fake_kernels_check_symbolic_shapes_under_fake_tensor_mode() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="lora_a must be"):
            ops.lora_linear(**dense_args("cpu", lora_a=torch.randn(R, IN + 1)))
        assert ops.lora_linear(**dense_args("cpu")).shape == (3, OUT)


@pytest.mark.parametrize(
    "mixed",
    [
        lambda: ops.lora_linear(**{**dense_args("cpu"), "x": torch.randn(3, IN, device="meta")}),
        lambda: ops.lora_linear(
            **{**dense_args("cpu"), "lora_b": torch.randn(OUT, R, device="meta")}
        ),
        lambda: ops.lora_linear_nf4(**{**nf4_args("cpu"), "absmax": torch.ones(2, device="meta")}),
        lambda: ops.nf4_dequantize(
            torch.zeros(64, dtype=torch.uint8, device="meta"),
            torch.ones(2),
            64,
            (8, 16),
            torch.float32,
        ),
        lambda: ops.blockwise8_quantize(torch.randn(256, device="meta"), dynamic_map(True), 256),
        lambda: ops.lora_merge_(
            torch.randn(OUT, IN), torch.randn(R, IN, device="meta"), torch.randn(OUT, R), 1.0
        ),
    ],
)
def test_a_meta_tensor_among_cpu_tensors_is_refused(mixed) -> None:
    with pytest.raises(RuntimeError, match="device"):
        mixed()


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("rows", [1, 2, 16])
def test_a_non_finite_lora_scale_is_refused(scale, rows) -> None:
    x = torch.randn(rows, IN)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.lora_linear(**{**dense_args("cpu", scale=scale), "x": x})
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.lora_linear_nf4(**{**nf4_args("cpu", scale=scale), "x": x})


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_a_non_finite_merge_scale_is_refused(scale) -> None:
    weight = torch.randn(OUT, IN)
    before = weight.clone()
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.lora_merge_(weight, torch.randn(R, IN), torch.randn(OUT, R), scale)
    assert torch.equal(weight, before)
    packed, absmax = ops.nf4_quantize(weight, 64)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.nf4_lora_merge(
            packed, absmax, 64, (OUT, IN), torch.randn(R, IN), torch.randn(OUT, R), scale
        )


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_the_native_ops_refuse_a_non_finite_scale_themselves(scale) -> None:
    # Callers of torch.ops.lorakit skip the Python wrappers; the C++ checks hold on their own.
    lib = torch.ops.lorakit
    dense, nf4 = dense_args("cpu", scale=scale), nf4_args("cpu", scale=scale)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        lib.lora_linear(*dense.values())
    with pytest.raises(RuntimeError, match="scale must be finite"):
        lib.lora_linear_nf4(*nf4.values())
    weight = torch.randn(OUT, IN)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        lib.lora_merge_(weight, torch.randn(R, IN), torch.randn(OUT, R), scale)
    packed, absmax = ops.nf4_quantize(weight, 64)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        lib.nf4_lora_merge(
            packed, absmax, 64, [OUT, IN], torch.randn(R, IN), torch.randn(OUT, R), scale
        )
