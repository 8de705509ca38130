"""Runs every CUDA kernel (csrc/**/*_kernels.cuh) under the CPU emulation against lorakit's CPU
kernels, on the inputs of the GPU tests (test_cuda_ops.py, test_lora_cuda.py, test_optim_ops.py).
Prints one line per kernel and a closing "N passed, M failed" line; exits 1 if any failed.

Usage: python tests/emulation/run_emulated.py [--lib PATH] [kernel ...]
(scripts/emulate_cuda.sh builds the library first.)
"""

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from emulated import Emulated

from cuda_cases import (
    BLOCKWISE8_BLOCKSIZES,
    NF4_BLOCKSIZES,
    SIZES,
    midpoint_neighbours,
    scaled_midpoint_blocks,
    special_values,
)
from lorakit import ops
from lorakit.quant import QuantizedAbsmax, dynamic_map

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The largest inputs run in float32 only: the element type changes only the loads, stores and
# conversions, which every smaller input covers in each type; the large ones add grid-stride
# loops and whole zero blocks, which do not depend on it. This keeps every CI run short.
LARGE = 100_000


def sizes_for(dtype: torch.dtype) -> list[int]:
    return [n for n in SIZES[1:] if dtype == torch.float32 or n < LARGE]  # 0 never launches


HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
# A case is a label and a function that returns "" when the emulated kernel agrees, else why not.
Case = tuple[str, Callable[[], str]]


def same(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """Equal shape and bits, except NaN payloads (a NaN must be a NaN on both sides)."""
    actual, expected = actual.reshape(-1), expected.reshape(-1)
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return f"got {actual.dtype} {tuple(actual.shape)}, want {expected.dtype} {expected.shape}"
    if actual.is_floating_point():
        nan = torch.isnan(expected)
        differ = torch.isnan(actual) != nan
        a, e = actual.masked_fill(nan, 0), expected.masked_fill(nan, 0)
        differ |= a.view(torch.uint8).reshape(a.numel(), -1).ne(
            e.view(torch.uint8).reshape(e.numel(), -1)).any(dim=1)  # fmt: skip
    else:
        differ = actual != expected
    if not differ.any():
        return ""
    i = int(differ.nonzero()[0])
    count = int(differ.sum())
    return f"{count} of {differ.numel()} differ, first at {i}: {actual[i]} != {expected[i]}"


def first_failure(*results: str) -> str:
    return next((r for r in results if r), "")


# ---- NF4 -------------------------------------------------------------------------------------


def nf4_inputs() -> Iterator[tuple[str, torch.Tensor, int]]:
    """test_nf4_matches_cpu, the bucket-boundary and the misaligned-storage inputs."""
    for dtype in FLOAT_DTYPES:
        for blocksize in NF4_BLOCKSIZES:
            for n in sizes_for(dtype):
                w = special_values(n, dtype) if n > 100 else (torch.randn(n) * 3).to(dtype)
                yield f"{dtype} blocksize {blocksize} n {n}", w, blocksize
    values = midpoint_neighbours()
    for blocksize in (32, 256, 1024):
        reps = -(-values.numel() // (blocksize - 1))
        ones = [torch.cat([torch.ones(1), chunk]) for chunk in values.split(blocksize - 1)]
        w = torch.cat(ones)
        w = torch.cat([w, torch.zeros(reps * blocksize - w.numel())])
        yield f"boundaries blocksize {blocksize}", w, blocksize
        yield f"boundaries blocksize {blocksize} partial", w[:-3], blocksize
    for dtype in FLOAT_DTYPES:
        for offset in (1, 3):  # off 16-byte alignment: the scalar paths
            base = (torch.randn(64 * 1000 + 17 + offset) * 2).to(dtype)
            yield f"{dtype} storage offset {offset}", base[offset:], 64


def nf4_quantize_cases(emu: Emulated) -> Iterator[Case]:
    for label, w, blocksize in nf4_inputs():

        def run(w: torch.Tensor = w, blocksize: int = blocksize) -> str:
            packed, absmax = emu.nf4_quantize(w, blocksize)
            want_packed, want_absmax = ops.nf4_quantize(w, blocksize)
            return first_failure(same(packed, want_packed), same(absmax, want_absmax))

        yield label, run


def nf4_dequantize_cases(emu: Emulated) -> Iterator[Case]:
    for label, w, blocksize in nf4_inputs():
        packed, absmax = ops.nf4_quantize(w, blocksize)
        yield (
            label,
            lambda p=packed, a=absmax, b=blocksize, w=w: same(
                emu.nf4_dequantize(p, a, b, w.numel(), w.dtype),
                ops.nf4_dequantize(p, a, b, w.shape, w.dtype),
            ),
        )
    n = 3 * 4096 * 2 + 5  # every byte value; negative, zero, subnormal, huge, Inf and NaN scales
    for dtype in FLOAT_DTYPES:
        for blocksize in (32, 64, 4096):
            packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
            absmax = torch.randn((n + blocksize - 1) // blocksize) * 100
            specials = torch.tensor([0.0, -1.0, 1e-40, 3e38, float("inf"), float("nan")])
            absmax[: specials.numel()] = specials[: absmax.numel()]
            yield (
                f"arbitrary bytes {dtype} blocksize {blocksize}",
                lambda p=packed, a=absmax, b=blocksize, d=dtype: same(
                    emu.nf4_dequantize(p, a, b, n, d), ops.nf4_dequantize(p, a, b, (n,), d)
                ),
            )
        # packed one byte into its storage: off its word alignment.
        w = (torch.randn(64 * 100 + 17) * 2).to(dtype)
        packed, absmax = ops.nf4_quantize(w, 64)
        shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), packed])[1:]
        yield (
            f"{dtype} packed off alignment",
            lambda p=shifted, a=absmax, w=w: same(
                emu.nf4_dequantize(p, a, 64, w.numel(), w.dtype),
                ops.nf4_dequantize(p, a, 64, w.shape, w.dtype),
            ),
        )


# ---- blockwise 8-bit -------------------------------------------------------------------------


def blockwise8_inputs() -> Iterator[tuple[str, torch.Tensor, torch.Tensor, int]]:
    for signed in (True, False):
        code = dynamic_map(signed)
        for dtype in FLOAT_DTYPES:
            for blocksize in BLOCKWISE8_BLOCKSIZES:
                for n in sizes_for(dtype):
                    x = special_values(n, dtype) if n > 100 else torch.randn(n).to(dtype)
                    if not signed:
                        x = x.abs()
                    label = (
                        f"{'signed' if signed else 'unsigned'} {dtype} blocksize {blocksize} n {n}"
                    )
                    yield label, x, code, blocksize
        # Where scaling by 1 / absmax and dividing by absmax pick different codes.
        x = scaled_midpoint_blocks(code, 3.7, signed)
        yield f"{'signed' if signed else 'unsigned'} scaled midpoints", x, code, 256


def blockwise8_quantize_cases(emu: Emulated) -> Iterator[Case]:
    for label, x, code, blocksize in blockwise8_inputs():

        def run(x: torch.Tensor = x, code: torch.Tensor = code, blocksize: int = blocksize) -> str:
            q, absmax = emu.blockwise8_quantize(x, code, blocksize)
            want_q, want_absmax = ops.blockwise8_quantize(x, code, blocksize)
            return first_failure(same(q, want_q), same(absmax, want_absmax))

        yield label, run


def blockwise8_dequantize_cases(emu: Emulated) -> Iterator[Case]:
    for label, x, code, blocksize in blockwise8_inputs():
        q, absmax = ops.blockwise8_quantize(x, code, blocksize)
        yield (
            label,
            lambda q=q, a=absmax, c=code, b=blocksize, d=x.dtype: same(
                emu.blockwise8_dequantize(q, a, c, b, d), ops.blockwise8_dequantize(q, a, c, b, d)
            ),
        )
    n = 256 * 300 + 11
    code = dynamic_map(True)
    for dtype in FLOAT_DTYPES:
        q = torch.randint(0, 256, (n,), dtype=torch.uint8)
        absmax = torch.randn((n + 255) // 256) * 10
        absmax[:5] = torch.tensor([0.0, -2.0, 1e-40, float("inf"), float("nan")])
        yield (
            f"arbitrary bytes {dtype}",
            lambda q=q, a=absmax, d=dtype: same(
                emu.blockwise8_dequantize(q, a, code, 256, d),
                ops.blockwise8_dequantize(q, a, code, 256, d),
            ),
        )
        shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), q])[1:]  # off 16-byte alignment
        yield (
            f"{dtype} q off alignment",
            lambda q=shifted, a=absmax, d=dtype: same(
                emu.blockwise8_dequantize(q, a, code, 256, d),
                ops.blockwise8_dequantize(q, a, code, 256, d),
            ),
        )


# ---- decode GEMV -------------------------------------------------------------------------------


def gemv_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The rule of test_lora_cuda.py: at most twice the error of plain PyTorch in x's dtype
    against float64, plus one rounding of that dtype (at least 1e-5 relative for float32, whose
    sums run in a different order in the kernel)."""
    exact = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    plain = x @ w.to(x.dtype).t() + (0 if bias is None else bias)
    floor = max(torch.finfo(x.dtype).eps, 1e-5)
    bound = 2 * (plain.double() - exact).abs().max() + floor * exact.abs().max()
    err = (y.double() - exact).abs().max()
    return "" if err <= bound else f"error {err:.3g} > bound {bound:.3g}"


def nf4_gemv_cases(emu: Emulated) -> Iterator[Case]:
    # test_lora_cuda.py's 512 x 384 weight at every decode row count, and a small odd shape whose
    # last CTA has idle warps and whose rows end inside a lane's first step.
    # Every row count in float32; the rows of test_lora_cuda.py (1, 4, 16) in the other types.
    for dtype in FLOAT_DTYPES:
        counts = range(1, 17) if dtype == torch.float32 else (1, 4, 16)
        shapes = [(512, 384, rows, True) for rows in counts] + [(72, 13, 3, False)]
        for n_in, n_out, rows, with_bias in shapes:
            w = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
            x = torch.randn(rows, n_in).to(dtype)
            bias = torch.randn(n_out).to(dtype) if with_bias else None
            packed, absmax = ops.nf4_quantize(w, 64)
            nested = QuantizedAbsmax.from_scales(absmax)
            label = f"{dtype} ({rows}, {n_in}) x ({n_out}, {n_in})^T"
            w32 = ops.nf4_dequantize(packed, absmax, 64, w.shape, torch.float32)
            yield (
                f"{label} float32 scales",
                lambda x=x, p=packed, a=absmax, b=bias, w32=w32: gemv_error(
                    emu.nf4_gemv(x, p, a, 64, w32.shape[0], b), x, w32, b
                ),
            )
            w32 = ops.nf4_dequantize(packed, nested.dequantize(), 64, w.shape, torch.float32)
            scales = (nested.q, nested.absmax, nested.code, nested.offset)
            yield (
                f"{label} double-quantized",
                lambda x=x, p=packed, s=scales, b=bias, w32=w32: gemv_error(
                    emu.nf4_gemv(x, p, s, 64, w32.shape[0], b), x, w32, b
                ),
            )


# ---- AdamW ------------------------------------------------------------------------------------


def hyper(
    step: int, grad_scale: float = 1.0, beta1: float = HYPER["beta1"]
) -> tuple[float, float, float, float, float, int, float]:
    h = HYPER
    return (h["lr"], beta1, h["beta2"], h["eps"], h["weight_decay"], step, grad_scale)


def adamw_cases(emu: Emulated) -> Iterator[Case]:
    # test_optim_ops.py's 32-bit inputs: both devices round each operation alike (no FMA), so the
    # state and the parameters agree to the bit after every step.
    for dtype in FLOAT_DTYPES:
        for n in (1, 1000, 70_001):

            def run(dtype: torch.dtype = dtype, n: int = n) -> str:
                p, m, v = torch.randn(n).to(dtype), torch.zeros(n), torch.zeros(n)
                ep, em, ev = p.clone(), m.clone(), v.clone()
                for step in range(1, 6):
                    g = torch.randn(n).to(dtype)
                    ops.adamw_step_(p, g, m, v, **HYPER, step=step, grad_scale=0.5)
                    emu.adamw_step_(ep, g, em, ev, hyper(step, 0.5))
                    failure = first_failure(same(ep, p), same(em, m), same(ev, v))
                    if failure:
                        return f"step {step}: {failure}"
                return ""

            yield f"{dtype} n {n}", run


def adamw8bit_cases(emu: Emulated) -> Iterator[Case]:
    code_m, code_v = dynamic_map(True), dynamic_map(False)
    for dtype in FLOAT_DTYPES:
        for n in (256, 4096, 10_000, 1):

            def run(dtype: torch.dtype = dtype, n: int = n) -> str:
                blocks = (n + 255) // 256
                p = torch.randn(n).to(dtype)
                state = [torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks)] * 2
                state = [t.clone() for t in state]
                ep, estate = p.clone(), [t.clone() for t in state]
                for step in range(1, 11):
                    g = (torch.randn(n) * torch.rand(1) * 3).to(dtype)
                    ops.adamw8bit_step_(p, g, *state, code_m, code_v, **HYPER, step=step)
                    emu.adamw8bit_step_(ep, g, estate, code_m, code_v, hyper(step))
                    failure = first_failure(
                        same(ep, p), *(same(e, s) for e, s in zip(estate, state, strict=True))
                    )
                    if failure:
                        return f"step {step}: {failure}"
                return ""

            yield f"{dtype} n {n}", run

    def scaled_midpoints() -> str:
        # With beta1 = 0 and zero state the new first moment is the gradient itself, whose
        # blocks lie where scaling by 1 / absmax and dividing by absmax pick different codes.
        g = scaled_midpoint_blocks(code_m, 3.7)
        n = g.numel()
        state = [torch.zeros(n, dtype=torch.uint8), torch.zeros(n // 256)] * 2
        state = [t.clone() for t in state]
        estate = [t.clone() for t in state]
        p, ep = torch.zeros(n), torch.zeros(n)
        ops.adamw8bit_step_(p, g, *state, code_m, code_v, **{**HYPER, "beta1": 0.0}, step=1)
        emu.adamw8bit_step_(ep, g, estate, code_m, code_v, hyper(1, beta1=0.0))
        return first_failure(same(ep, p), *(same(e, s) for e, s in zip(estate, state, strict=True)))

    yield "scaled midpoints", scaled_midpoints


# ---- merge ------------------------------------------------------------------------------------


def merge_shapes(dtype: torch.dtype) -> list[tuple[int, int, int]]:
    # A layer-sized weight, odd sizes; in float32 also more columns than one grid row covers
    # (x grid-stride) and more rows than the grid's 65535 (y grid-stride).
    shapes = [(384, 512, 8), (7, 1000, 3)]
    large = [(3, 256 * 1024 + 5, 2), (65_537, 3, 1)]
    return shapes + large if dtype == torch.float32 else shapes


def lora_merge_cases(emu: Emulated) -> Iterator[Case]:
    # Both devices sum b[i, k] a[k, j] in k order in float32 and round each operation (the
    # emulation never contracts to FMA), so they agree to the bit; a GPU may not (its own test
    # allows for contraction).
    for dtype in FLOAT_DTYPES:
        for out, n_in, r in merge_shapes(dtype):
            w = torch.randn(out, n_in).to(dtype)
            a, b = torch.randn(r, n_in).to(dtype), torch.randn(out, r).to(dtype)

            def run(w: torch.Tensor = w, a: torch.Tensor = a, b: torch.Tensor = b) -> str:
                want, got = w.clone(), w.clone()
                ops.lora_merge_(want, a, b, 0.5)
                emu.lora_merge_(got, a, b, 0.5)
                return same(got, want)

            yield f"{dtype} ({out}, {n_in}) rank {r}", run


def nf4_lora_merge_cases(emu: Emulated) -> Iterator[Case]:
    # merge_cuda.cu's NF4 merge: dequantize to float32, the dense merge kernel, quantize; against
    # the CPU's fused per-block merge, which rounds the same operations.
    for blocksize in (64, 4096):
        for out, n_in, r in [(384, 512, 8), (7, 1000, 3)]:
            w = torch.randn(out, n_in)
            packed, absmax = ops.nf4_quantize(w, blocksize)
            a, b = torch.randn(r, n_in), torch.randn(out, r)

            def run(p=packed, am=absmax, a=a, b=b, bs=blocksize, shape=(out, n_in)) -> str:
                want_packed, want_absmax = ops.nf4_lora_merge(p, am, bs, shape, a, b, 0.5)
                dense = emu.nf4_dequantize(p, am, bs, shape[0] * shape[1], torch.float32)
                dense = dense.reshape(shape)
                emu.lora_merge_(dense, a, b, 0.5)
                got_packed, got_absmax = emu.nf4_quantize(dense, bs)
                return first_failure(same(got_packed, want_packed), same(got_absmax, want_absmax))

            yield f"blocksize {blocksize} ({out}, {n_in}) rank {r}", run


# ---- fused linear cross-entropy -----------------------------------------------------------------


def within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float, what: str) -> str:
    err = (got.double() - want.double()).abs()
    over = err > bound
    if not over.any():
        return ""
    i = int(over.flatten().nonzero()[0])
    return (
        f"{what}: {int(over.sum())} values beyond the bound, first at {i}: {err.flatten()[i]:.3g}"
    )


def fused_ce_rows_cases(emu: Emulated) -> Iterator[Case]:
    # The row kernel on h Wᵀ against the CPU op (which forms the same logits with the same GEMM):
    # the log-probs, and the hidden states' gradient g W. Not bitwise: the two devices' exp differ
    # (the CPU's is a polynomial within 2 ulp) and sum in different orders, so each compares
    # within a few float32 ulps of the values' size plus, for the gradient, one rounding of the
    # dtype per term of g W and the float32 sums of g W. A vocabulary below the block's 512
    # threads leaves threads idle; 4099 gives each thread a ragged share. Row 1 is ignored
    # (-100); softcap 30 is Gemma 2's.
    for dtype in FLOAT_DTYPES:
        eps = torch.finfo(dtype).eps
        for rows, vocab, size in [(6, 37, 16), (5, 1000, 32), (3, 4099, 24)]:
            for softcap in (0.0, 30.0):
                for per_row in (False, True):

                    def run(dtype=dtype, rows=rows, vocab=vocab, size=size, softcap=softcap,
                            per_row=per_row, eps=eps) -> str:  # fmt: skip
                        h = torch.randn(rows, size).to(dtype)
                        w = (torch.randn(vocab, size) * 3 / size**0.5).to(dtype)
                        labels = torch.randint(0, vocab, (rows,))
                        labels[1] = -100
                        r = torch.randn(rows) if per_row else None
                        x = h.clone().requires_grad_()
                        if per_row:  # the log-probs' backward with a per-token gradient r
                            want_lp = ops.fused_linear_logprobs(x, w, labels, 0, softcap)
                            (want_lp * r).sum().backward()
                        else:  # the summed cross-entropy's
                            want_lp = ops.fused_linear_logprobs(h, w, labels, 0, softcap)
                            ops.fused_linear_cross_entropy(x, w, labels, 0, softcap).backward()
                        logits = h @ w.t()
                        scale = -1.0 if per_row else 1.0
                        lp, g = emu.fused_ce_rows(logits, labels, r, scale, softcap, True)
                        gh = g @ w
                        lp_bound = 1e-5 * (1 + want_lp.abs()) + 4 * eps * logits.abs().max()
                        # g W sums vocab products in float32 on both sides, in different
                        # orders: sqrt(vocab) float32 roundings of |g| |W| on top.
                        magnitude = g.double().abs() @ w.double().abs()
                        sums = vocab**0.5 * torch.finfo(torch.float32).eps * magnitude
                        gh_bound = 4 * eps * magnitude + sums + eps * x.grad.double().abs()
                        return first_failure(
                            within(lp, want_lp, lp_bound, "logprobs"),
                            within(gh, x.grad, gh_bound, "grad_hidden"),
                        )

                    label = f"{dtype} ({rows}, {vocab}) softcap {softcap} per-row {per_row}"
                    yield label, run


KERNELS: dict[str, Callable[[Emulated], Iterator[Case]]] = {
    "nf4_quantize_kernel": nf4_quantize_cases,
    "nf4_dequantize_kernel": nf4_dequantize_cases,
    "blockwise8_quantize_kernel": blockwise8_quantize_cases,
    "blockwise8_dequantize_kernel": blockwise8_dequantize_cases,
    "nf4_gemv_kernel": nf4_gemv_cases,
    "adamw_kernel": adamw_cases,
    "adamw8bit_kernel": adamw8bit_cases,
    "lora_merge_kernel": lora_merge_cases,
    "nf4_lora_merge (dequantize, merge, quantize)": nf4_lora_merge_cases,
    "fused_ce_rows_kernel": fused_ce_rows_cases,
}


def run_kernel(emu: Emulated, name: str) -> bool:
    torch.manual_seed(0)
    start = time.perf_counter()
    count, failures, first = 0, 0, ""
    for label, case in KERNELS[name](emu):
        count += 1
        try:
            why = case()
        except RuntimeError as e:  # KernelError, or a CPU op refusing the input
            why = str(e)
        if why:
            failures += 1
            first = first or f"{label}: {why}"
    seconds = time.perf_counter() - start
    if failures:
        print(f"FAIL {name}: {failures} of {count} cases failed, {seconds:.1f} s; first: {first}")
    else:
        print(f"ok   {name}: {count} cases, {seconds:.1f} s")
    sys.stdout.flush()
    return not failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", help="the emulated kernels' library (default: build/emulation)")
    parser.add_argument("kernels", nargs="*", help=f"default: all of {', '.join(KERNELS)}")
    args = parser.parse_args()
    unknown = [k for k in args.kernels if k not in KERNELS]
    if unknown:
        parser.error(f"unknown kernel {unknown[0]}; known: {', '.join(KERNELS)}")
    emu = Emulated(args.lib)
    results = [run_kernel(emu, name) for name in args.kernels or KERNELS]
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
