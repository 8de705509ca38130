"""Times NF4 quantize and dequantize: lorakit against bitsandbytes and a plain-PyTorch reference.

Usage (from the repository root):

    PYTHONPATH=python python benchmarks/bench_nf4.py [--device cpu|cuda] [--sizes 4096 8192]
        [--repeats N] [--warmup N] [--threads N] [--out FILE]

Each weight is a square bfloat16 matrix quantized in blocks of 64. Every call allocates its
outputs, as the ops do when used. Times are medians of ``--repeats`` calls after ``--warmup``
calls (bitsandbytes builds and caches kernels on its first calls, so a few warm-up calls matter).
The CPU clock is ``time.perf_counter``; on CUDA each call is bracketed by CUDA events.

Bandwidth counts the bytes an ideal kernel must move, the same for every implementation: the
bfloat16 weight (2 bytes per element), the packed indices (0.5 byte per element) and the float32
absmax (4 bytes per block), read or written once. On CUDA the achieved bandwidth is also compared
with a device-to-device ``copy_`` of a buffer far larger than the L2 cache.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnb_f
import torch

import lorakit
from lorakit import ops

# The plain-PyTorch reference that the tests also compare against.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import nf4_reference as reference

DTYPE = torch.bfloat16
OPS = ("quantize", "dequantize")
IMPLS = ("lorakit", "bnb", "ref")
IMPL_LABELS = {"lorakit": "lorakit", "bnb": "bitsandbytes", "ref": "PyTorch reference"}

# Targets: CPU speed-ups over bitsandbytes; CUDA fractions of device copy bandwidth.
CPU_MIN_SPEEDUP = 3.0
MAX_P90_OVER_MEDIAN = 1.5  # no stalls: single calls stay near the median (issue 14)
CUDA_MIN_COPY_FRACTION = {"dequantize": 0.85, "quantize": 0.60}
COPY_BYTES = 1 << 30  # 1 GiB, far larger than any L2 cache
FLUSH_BYTES = 256 << 20  # overwritten before each timed CUDA call; H100 / H200 L2 is 50 MiB


# ---- implementations ------------------------------------------------------------------------
# Each returns a zero-argument closure with its inputs prepared outside the timed region.

Quantized = tuple[torch.Tensor, torch.Tensor]


def quantize_call(impl: str, w: torch.Tensor, blocksize: int) -> Callable[[], Quantized]:
    """A call that quantizes ``w`` and returns ``(packed, absmax)``."""
    if impl == "lorakit":
        return lambda: ops.nf4_quantize(w, blocksize)
    if impl == "bnb":

        def bnb_quantize() -> Quantized:
            packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
            return packed, state.absmax

        return bnb_quantize
    return lambda: reference.nf4_quantize(w, blocksize)


def dequantize_call(impl: str, w: torch.Tensor, blocksize: int) -> Callable[[], torch.Tensor]:
    """A call that dequantizes ``w``'s NF4 form (made by the same implementation) to bfloat16."""
    if impl == "bnb":
        packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        return lambda: bnb_f.dequantize_4bit(packed, state)
    packed, absmax = quantize_call(impl, w, blocksize)()
    if impl == "lorakit":
        return lambda: ops.nf4_dequantize(packed, absmax, blocksize, w.shape, w.dtype)
    return lambda: reference.nf4_dequantize(packed, absmax, blocksize, w.shape, w.dtype)


def agreement(w: torch.Tensor, blocksize: int) -> str:
    """Says whether bitsandbytes and the reference reproduce lorakit's bytes and values."""
    packed, absmax = quantize_call("lorakit", w, blocksize)()
    restored = dequantize_call("lorakit", w, blocksize)()
    notes = []
    for impl in ("bnb", "ref"):
        other_packed, other_absmax = quantize_call(impl, w, blocksize)()
        other_restored = dequantize_call(impl, w, blocksize)()
        bad_bytes = int((other_packed.reshape(-1) != packed).sum())
        same = (
            bad_bytes == 0
            and torch.equal(other_absmax, absmax)
            and torch.equal(other_restored, restored)
        )
        notes.append(f"{impl} {'identical' if same else f'DIFFERS ({bad_bytes} bytes)'}")
    return ", ".join(notes)


# ---- timing ----------------------------------------------------------------------------------


def time_cpu_ms(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_cuda_ms(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Times each call between CUDA events, after overwriting a buffer larger than the L2 cache.

    The overwrite (as in Triton's ``do_bench``) evicts the previous call's data, so a 32 MiB
    weight is read from memory rather than from a 50 MiB L2, and it keeps the GPU busy while the
    host enqueues the call, so the events time the kernels rather than the launch overhead.
    """
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def copy_bandwidth_gbs(warmup: int, repeats: int) -> float:
    """Device-to-device ``copy_`` bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = statistics.median(time_cuda_ms(lambda: dst.copy_(src), warmup, repeats))
    return 2 * COPY_BYTES / (ms * 1e6)


# ---- report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    op: str
    size: int
    impl: str
    times_ms: list[float] | None  # None when the implementation failed
    error: str = ""

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def p90_ms(self) -> float | None:
        """The tail: single calls that stall (page faults, memory compaction) show here."""
        if not self.times_ms:
            return None
        if len(self.times_ms) == 1:
            return self.times_ms[0]
        return statistics.quantiles(self.times_ms, n=10, method="inclusive")[-1]


def nf4_bytes(numel: int, blocksize: int) -> int:
    """Bytes moved by one quantize or dequantize: bf16 weight + packed indices + absmax."""
    return numel * 2 + numel // 2 + numel // blocksize * 4


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    return f"{commit}{' (dirty tree)' if dirty else ''}"


def memory_note() -> str:
    """How fresh CPU pages arrive: transparent huge pages and torch's opt-in for them."""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    opt_in = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    return f"- transparent huge pages: {thp}; THP_MEM_ALLOC_ENABLE={opt_in}"


def load_note(when: str) -> str:
    """The 1-minute load average: other work on a shared machine skews CPU timings."""
    return f"- load average {when}: {os.getloadavg()[0]:.2f}"


def first_touch_note(size: int, warmup: int, repeats: int) -> str:
    """Times writing a fresh bf16 output against writing a reused one (CPU only).

    Every op here returns a newly allocated output. glibc serves allocations of 32 MiB and more
    with a fresh ``mmap`` and unmaps them on free, so each call first-touches (page-faults and
    zeroes) its whole output again; the difference of these two times is that cost.
    """
    fresh = statistics.median(
        time_cpu_ms(lambda: torch.empty(size, size, dtype=DTYPE).fill_(1), warmup, repeats)
    )
    buffer = torch.zeros(size, size, dtype=DTYPE)
    reused = statistics.median(time_cpu_ms(lambda: buffer.fill_(1), warmup, repeats))
    return (
        f"- output first touch at {size}x{size}: torch.empty + fill_ {fresh:.2f} ms, "
        f"fill_ of a reused buffer {reused:.2f} ms"
    )


def header(args: argparse.Namespace) -> list[str]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"# NF4 quantize / dequantize, {args.device}",
        "",
        f"- device: {device_name(args.device)}",
        f"- torch: {torch.__version__}",
        f"- bitsandbytes: {bitsandbytes.__version__}",
        f"- lorakit: {lorakit.build_info()}",
        f"- git commit: {git_commit()}",
        f"- threads: {torch.get_num_threads()}",
        f"- run: {now}; bf16 weights, blocksize {args.blocksize}, "
        f"median of {args.repeats} after {args.warmup} warm-up calls",
        *([memory_note()] if args.device == "cpu" else []),
        load_note("at start"),
    ]


def ms_text(ms: float) -> str:
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.4f}"


def ratio_text(m: Measurement, base: Measurement | None) -> str:
    if m.impl == "lorakit":
        return "1.0x"
    if m.median_ms is None or base is None or base.median_ms is None:
        return "n/a"
    return f"{m.impl}/lorakit {m.median_ms / base.median_ms:.1f}x"


def table(
    results: Sequence[Measurement], blocksize: int, copy_gbs: float | None = None
) -> list[str]:
    cols = ["op", "shape", "impl", "median ms", "min ms", "p90 ms", "GB/s", "time vs lorakit"]
    if copy_gbs is not None:
        cols.append("% of copy BW")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in results:
        base = find(results, m.op, m.size, "lorakit")
        shape = f"{m.size}x{m.size}"
        if m.median_ms is None or m.times_ms is None:
            cells = [m.op, shape, m.impl, f"error: {m.error}", "", "", "", ""]
            if copy_gbs is not None:
                cells.append("")
        else:
            gbs = nf4_bytes(m.size * m.size, blocksize) / (m.median_ms * 1e6)
            cells = [
                m.op,
                shape,
                m.impl,
                ms_text(m.median_ms),
                ms_text(min(m.times_ms)),
                ms_text(m.p90_ms or 0.0),
                f"{gbs:.1f}",
                ratio_text(m, base),
            ]
            if copy_gbs is not None:
                cells.append(f"{100 * gbs / copy_gbs:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def find(results: Sequence[Measurement], op: str, size: int, impl: str) -> Measurement | None:
    for m in results:
        if (m.op, m.size, m.impl) == (op, size, impl):
            return m
    return None


def verdicts(
    results: Sequence[Measurement], device: str, blocksize: int, copy_gbs: float | None
) -> list[str]:
    """One PASS/FAIL line per target, op and shape."""
    lines = []
    sizes = sorted({m.size for m in results})
    for op in OPS:
        for size in sizes:
            mine, bnb = find(results, op, size, "lorakit"), find(results, op, size, "bnb")
            name = f"{device} {op} {size}x{size}"
            if mine is None or mine.median_ms is None:
                lines.append(f"FAIL  {name}: lorakit did not run")
                continue
            checks: list[tuple[bool, str]] = []
            bnb_ms = bnb.median_ms if bnb is not None else None
            if device == "cpu":
                if bnb_ms is None:
                    lines.append(f"FAIL  {name}: bitsandbytes did not run, no speed-up to check")
                    continue
                speedup = bnb_ms / mine.median_ms
                checks.append(
                    (
                        speedup >= CPU_MIN_SPEEDUP,
                        f"{speedup:.2f}x faster than bitsandbytes (target >= {CPU_MIN_SPEEDUP}x)",
                    )
                )
            else:
                assert copy_gbs is not None
                gbs = nf4_bytes(size * size, blocksize) / (mine.median_ms * 1e6)
                need = CUDA_MIN_COPY_FRACTION[op]
                checks.append(
                    (
                        gbs / copy_gbs >= need,
                        f"{100 * gbs / copy_gbs:.0f}% of copy bandwidth "
                        f"(target >= {100 * need:.0f}%)",
                    )
                )
                if op == "dequantize" and bnb_ms is None:
                    checks.append((False, "vs bitsandbytes: bitsandbytes did not run"))
                elif op == "dequantize":
                    speedup = bnb_ms / mine.median_ms
                    checks.append(
                        (speedup >= 1.0, f"{speedup:.2f}x bitsandbytes' speed (target >= 1x)")
                    )
            tail = (mine.p90_ms or 0.0) / mine.median_ms
            checks.append(
                (tail <= MAX_P90_OVER_MEDIAN, f"p90 {tail:.2f}x the median (target <= 1.5x)")
            )
            for ok, text in checks:
                lines.append(f"{'PASS' if ok else 'FAIL'}  {name}: lorakit {text}")
    return lines


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="square sides")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    timer = time_cuda_ms if args.device == "cuda" else time_cpu_ms

    lines = header(args)
    for line in lines:
        print(line, flush=True)
    notes = []
    results: list[Measurement] = []
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for size in args.sizes:
        w = torch.randn(size, size, generator=generator, device=args.device).to(DTYPE)
        try:
            notes.append(f"- agreement at {size}x{size}: {agreement(w, args.blocksize)}")
        except Exception as e:  # e.g. no lorakit kernel for this device
            reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
            notes.append(f"- agreement at {size}x{size}: not checked ({reason})")
        print(notes[-1], flush=True)
        if args.device == "cpu":
            notes.append(first_touch_note(size, args.warmup, args.repeats))
            print(notes[-1], flush=True)
        for op in OPS:
            make = quantize_call if op == "quantize" else dequantize_call
            for impl in IMPLS:
                try:
                    times = timer(make(impl, w, args.blocksize), args.warmup, args.repeats)
                    results.append(Measurement(op, size, impl, times))
                except Exception as e:
                    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
                    results.append(Measurement(op, size, impl, None, first_line[:80]))
                median = results[-1].median_ms
                done = f"{ms_text(median)} ms" if median is not None else results[-1].error
                print(f"  timed {op} {size}x{size} {impl}: {done}", flush=True)
        del w
    results.sort(key=lambda m: (OPS.index(m.op), m.size, IMPLS.index(m.impl)))

    notes.append(load_note("at end"))
    copy_gbs = None
    if args.device == "cuda":
        copy_gbs = copy_bandwidth_gbs(args.warmup, max(args.repeats, 20))
        notes.append(f"- device copy bandwidth (1 GiB copy_, read + write): {copy_gbs:.0f} GB/s")

    impls_line = ", ".join(f"{k} = {v}" for k, v in IMPL_LABELS.items())
    report = [
        *lines,
        *notes,
        f"- impls: {impls_line}; 'time vs lorakit' is impl time / lorakit time",
        "",
        *table(results, args.blocksize, copy_gbs),
        "",
        *verdicts(results, args.device, args.blocksize, copy_gbs),
    ]
    print("\n" + "\n".join(report[len(lines) :]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
