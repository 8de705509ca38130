"""AdamW step time and state memory: lorakit fused 32-bit / 8-bit against torch and bitsandbytes.

Usage: PYTHONPATH=python python benchmarks/bench_optim.py [--device cpu|cuda] [--params 50e6]
    [--clock wall|cpu] [--paged-params 1e9] [--page-budget-mb 512]

Every optimizer steps its own parameters of the same sizes (10 tensors) with fixed gradients; the
optimizers take turns, one step each per round, and each one's time is the median (and p90) of
--repeats steps after --warmup steps (all of them are alive at once: at 50M parameters about 4 GB
of parameters, gradients and state). State bytes per parameter are measured from the
optimizer's state tensors. On a shared CPU, --clock cpu times steps by the CPU time of this
process (all its threads), which other processes' load does not inflate as it does wall time.

On a GPU it also steps --paged-params parameters with paged state under --page-budget-mb: the
GPU memory the step takes beyond parameters and gradients (torch.cuda.max_memory_allocated),
and the state bytes moved per second against the host-to-device bandwidth measured here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import lorakit
from lorakit.optim import AdamW
from measure import cpu_paths

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
Clock = Callable[[], float]


def _params(total: int, device: str) -> list[torch.nn.Parameter]:
    sizes = [total // 10] * 9 + [total - 9 * (total // 10)]
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, device=device) * 0.02)
        p.grad = torch.randn(n, device=device) * 1e-3
        params.append(p)
    return params


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    state_per_param: float


def _measure(
    factories: dict[str, Factory],
    total: int,
    device: str,
    warmup: int,
    repeats: int,
    clock: Clock,
) -> dict[str, Timing]:
    """Steps every optimizer in turn, one step each per round, so that a change in the machine's
    load during the run reaches all of them alike (their ratios are what the targets are on)."""
    opts = {name: factory(_params(total, device)) for name, factory in factories.items()}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for round_ in range(warmup + repeats):
        for name, opt in opts.items():
            _sync(device)
            start = clock()
            opt.step()
            _sync(device)
            if round_ >= warmup:
                times[name].append(clock() - start)
    results = {}
    for name, opt in opts.items():
        t = sorted(times[name])
        p90 = t[min(len(t) - 1, round(0.9 * (len(t) - 1)))]
        per_param = _state_bytes(opt) / total
        results[name] = Timing(statistics.median(t) * 1e3, p90 * 1e3, per_param)
    return results


def _candidates(device: str) -> dict[str, Factory]:
    lr = {"lr": 1e-4, "weight_decay": 0.01}
    found: dict[str, Factory] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **lr),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **lr),
        "lorakit AdamW 32-bit": lambda ps: AdamW(ps, **lr),
        "lorakit AdamW 8-bit": lambda ps: AdamW(ps, state_bits=8, **lr),
    }
    if device == "cuda":
        try:
            import bitsandbytes as bnb

            found["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, **lr)
        except ImportError:
            print("bitsandbytes not installed: its AdamW8bit is left out")
    return found


def _copy_bandwidth(nbytes: int, to_device: bool, repeats: int = 5) -> float:
    """Median bytes per second of one pinned host <-> GPU copy of ``nbytes``."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 1):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        if to_device:
            device.copy_(host, non_blocking=True)
        else:
            host.copy_(device, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[1:])


def _paged(total: int, budget_mb: float, state_bits: int, warmup: int, repeats: int) -> None:
    params = _params(total, "cuda")
    opt = AdamW(params, lr=1e-4, state_bits=state_bits, paged=True, page_budget_mb=budget_mb)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    state = _state_bytes(opt)
    step = statistics.median(times)
    del opt, params
    torch.cuda.empty_cache()
    rate = state / step  # each direction moves all state once per step
    print(
        f"| {state_bits}-bit | {step * 1e3:.1f} | {peak_mb:.0f} | {budget_mb:.0f} | "
        f"{state / 2**30:.2f} | {rate / 1e9:.1f} |"
    )


def _paged_section(args: argparse.Namespace) -> None:
    total = int(args.paged_params)
    h2d = _copy_bandwidth(1 << 30, to_device=True)
    d2h = _copy_bandwidth(1 << 30, to_device=False)
    budget = args.page_budget_mb
    print(f"\n# Paged AdamW, {total / 1e9:.2f}B float32 parameters, budget {budget} MB")
    print(f"pinned host->GPU {h2d / 1e9:.1f} GB/s, GPU->host {d2h / 1e9:.1f} GB/s (1 GiB copies)")
    print("GPU memory = peak allocated during the steps beyond parameters and gradients\n")
    print("| state | step (ms) | GPU memory (MB) | budget (MB) | state (GiB) | state GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for bits in (32, 8):
        _paged(total, args.page_budget_mb, bits, args.warmup, max(3, args.repeats // 3))
    print(f"\ntarget: state GB/s >= 70% of {h2d / 1e9:.1f} = {0.7 * h2d / 1e9:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--params", type=float, default=50e6, help="number of parameters")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--paged-params", type=float, default=1e9, help="paged run (GPU only)")
    parser.add_argument("--page-budget-mb", type=float, default=512.0)
    args = parser.parse_args()
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu does not time GPU work")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    total = int(args.params)
    device = args.device
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU, {torch.get_num_threads()} threads, {cpu_paths()}"
    print(f"# AdamW step, {total / 1e6:.0f}M parameters in 10 tensors, {where}")
    print(f"torch {torch.__version__}, lorakit {lorakit.build_info().version}")
    print(
        f"median and p90 {args.clock} time of {args.repeats} steps after {args.warmup} warm-up "
        "steps, the optimizers stepping in turn\n"
    )
    results = _measure(_candidates(device), total, device, args.warmup, args.repeats, clock)
    bar = results["torch AdamW fused"].median_ms
    print("| optimizer | step (ms) | p90 (ms) | vs torch fused | state bytes/param |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r.median_ms:.1f} | {r.p90_ms:.1f} | {r.median_ms / bar:.2f}x | "
            f"{r.state_per_param:.3f} |"
        )
    ours32 = results["lorakit AdamW 32-bit"].median_ms
    ours8 = results["lorakit AdamW 8-bit"].median_ms
    print(f"\nlorakit 32-bit / torch fused: {ours32 / bar:.2f} (target <= 1.00)")
    print(f"lorakit 8-bit / torch fused: {ours8 / bar:.2f} (target <= 2.00)")
    if "bitsandbytes AdamW8bit" in results:
        bnb8 = results["bitsandbytes AdamW8bit"].median_ms
        print(f"lorakit 8-bit / bitsandbytes AdamW8bit: {ours8 / bnb8:.2f} (target <= 1.00)")
    if device == "cuda":
        _paged_section(args)


if __name__ == "__main__":
    main()
