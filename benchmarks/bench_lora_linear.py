"""LoRA / QLoRA linear: lorakit against PEFT on nn.Linear, PEFT on bitsandbytes Linear4bit and the
dense linear, side by side in one run.

    PYTHONPATH=python python benchmarks/bench_lora_linear.py [--device cuda] [--output FILE]

Cases run round-robin (one call of each per round) so that load from other processes hits all of
them alike; times are medians after warm-up (bitsandbytes compiles itself on its first calls).
Memory: on CUDA the peak allocated during a call; on the CPU the bytes the layer holds plus the
bytes autograd saves for the backward (torch has no CPU peak-memory counter).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import bitsandbytes as bnb
import peft
import torch
from torch import nn

from lorakit.nn import LoRALinear, NF4Linear
from measure import cpu_paths

# (name, tokens, in, out, dtype) per device; decode rows run forward only, without grad.
TRAIN = {
    "cpu": [(1024, 2048, 2048, torch.float32)],
    "cuda": [(8192, 4096, 4096, torch.bfloat16), (8192, 4096, 14336, torch.bfloat16)],
}
DECODE = {"cpu": ([1, 16], 2048, 2048), "cuda": ([1, 4, 16], 4096, 4096)}
RANK, ALPHA = 16, 32


class One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def peft_wrap(base: nn.Module) -> nn.Module:
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["layer"])
    return peft.get_peft_model(One(base), config).base_model.model.layer


def bnb_4bit(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=linear.weight.dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=64
    )
    return layer.to(linear.weight.device)


def layers(n_in: int, n_out: int, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    base = nn.Linear(n_in, n_out, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    lora = LoRALinear(copy.deepcopy(base), RANK, ALPHA)
    qlora = LoRALinear(NF4Linear.from_linear(base), RANK, ALPHA)
    return {
        "dense linear": base,
        "PEFT LoRA": peft_wrap(copy.deepcopy(base)).to(dtype),
        "lorakit LoRA": lora,
        "PEFT + bnb 4-bit": peft_wrap(bnb_4bit(base)).to(dtype),
        "lorakit QLoRA": qlora,
    }


@dataclass
class Result:
    ms: float
    mem_mib: float


def layer_tensors(layer: nn.Module) -> dict[int, int]:
    tensors = {t.data_ptr(): t.nbytes for t in (*layer.parameters(), *layer.buffers())}
    for m in layer.modules():
        if isinstance(m, NF4Linear):
            tensors |= {t.data_ptr(): t.nbytes for t in m.weight.state_dict().values()}
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state
            tensors |= {t.data_ptr(): t.nbytes for t in (state.absmax, state.state2.absmax)}
    return tensors


def memory(call: Callable[[], None], layer: nn.Module, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    # Saved tensors that are the layer's own (weights, adapters) are counted once.
    tensors = layer_tensors(layer)

    def pack(t: torch.Tensor) -> torch.Tensor:
        tensors[t.data_ptr()] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return sum(tensors.values()) / 2**20


def bench(
    calls: dict[str, Callable[[], None]],
    modules: dict[str, nn.Module],
    device: str,
    rounds: int,
    warmup: int = 3,
) -> dict[str, Result]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    return {
        name: Result(1e3 * statistics.median(t), memory(calls[name], modules[name], device))
        for name, t in times.items()
    }


def train_calls(modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, Callable[[], None]]:
    def step(layer: nn.Module) -> Callable[[], None]:
        def call() -> None:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).sum().backward()

        return call

    return {name: step(m) for name, m in modules.items() if name != "dense linear"}


def decode_calls(modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, Callable[[], None]]:
    def forward(layer: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                layer(x)

        return call

    wanted = ("dense linear", "PEFT + bnb 4-bit", "lorakit QLoRA")
    return {name: forward(modules[name]) for name in wanted}


def table(title: str, results: dict[str, Result], ratios: list[tuple[str, str, str]]) -> str:
    mem = "peak MiB" if torch.cuda.is_available() else "layer + saved MiB"
    lines = [f"### {title}", "", f"| case | median ms | {mem} |", "|---|---:|---:|"]
    lines += [f"| {n} | {r.ms:.3f} | {r.mem_mib:.1f} |" for n, r in results.items()]
    lines += ["", "| ratio | value | target |", "|---|---:|---|"]
    for slow, fast, target in ratios:
        value = results[slow].ms / results[fast].ms
        lines.append(f"| {slow} / {fast} | {value:.2f}x | {target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", help="also write the report to this markdown file")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    report = [
        f"## LoRA linear, {device}: torch {torch.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bnb.__version__}, {torch.get_num_threads()} threads, {cpu_paths()}, "
        f"r={RANK}, "
        f"load average at start {os.getloadavg()[0]:.2f} (other processes share the machine)\n"
    ]
    for tokens, n_in, n_out, dtype in TRAIN[device]:
        modules = layers(n_in, n_out, dtype, device)
        x = torch.randn(tokens, n_in, dtype=dtype, device=device, requires_grad=True)
        results = bench(train_calls(modules, x), modules, device, args.rounds)
        title = f"training: {tokens} tokens, {n_in}->{n_out}, {dtype}, forward + backward"
        ratios = [
            ("lorakit LoRA", "PEFT LoRA", "<= 1.00x (no slower than PEFT)"),
            ("PEFT + bnb 4-bit", "lorakit QLoRA", ">= 1.05x"),
            ("lorakit QLoRA", "lorakit LoRA", "<= 1.05x"),
        ]
        report.append(table(title, results, ratios))
        print(report[-1], flush=True)
    rows_list, n_in, n_out = DECODE[device]
    modules = layers(n_in, n_out, torch.bfloat16, device)
    for rows in rows_list:
        x = torch.randn(rows, n_in, dtype=torch.bfloat16, device=device)
        results = bench(decode_calls(modules, x), modules, device, 10 * args.rounds)
        title = f"decode: {rows} rows, {n_in}->{n_out}, bfloat16, forward without grad"
        ratios = [
            ("PEFT + bnb 4-bit", "lorakit QLoRA", ">= 4x (CPU), >= 1.5x (GPU)"),
            ("dense linear", "lorakit QLoRA", ">= 1.0x (CPU), >= 2.5x (GPU, 1 row)"),
        ]
        report.append(table(title, results, ratios))
        print(report[-1], flush=True)
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(report))


if __name__ == "__main__":
    main()
