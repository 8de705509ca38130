"""bf16 autocast: the LoRA ops inside ``torch.autocast`` (bf16 activations, float32 adapter
weights with float32 gradients), which devices ``--autocast auto`` picks, and an SFT run whose
bf16 losses stay close to float32's."""

import json

import pytest
import torch

from lorakit import cpu_features, ops
from lorakit.cli import main
from lorakit.train import precision
from sft_helpers import qa_rows, saved_model

CPU = torch.device("cpu")


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, 64, generator=gen)
    weight = torch.randn(48, 64, generator=gen) / 8
    bias = torch.randn(48, generator=gen)
    a = (torch.randn(8, 64, generator=gen) / 8).requires_grad_()
    b = (torch.randn(48, 8, generator=gen) / 8).requires_grad_()
    return x, weight, bias, a, b


def _reference(x, weight, bias, a, b, scale):
    x, weight, bias, a, b = (t.detach().double() for t in (x, weight, bias, a, b))
    a.requires_grad_()
    b.requires_grad_()
    y = x @ weight.T + bias + scale * (x @ a.T) @ b.T
    y.sum().backward()
    return y, a.grad, b.grad


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_ops_run_in_bf16_under_autocast_with_float32_adapter_grads(base: str) -> None:
    x, weight, bias, a, b = _inputs()
    scale = 2.0
    if base == "nf4":
        packed, absmax = ops.nf4_quantize(weight, 64)
        weight = ops.nf4_dequantize(packed, absmax, 64, weight.shape, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if base == "nf4":
            y = ops.lora_linear_nf4(x, packed, absmax, 64, bias, a, b, scale)
        else:
            y = ops.lora_linear(x, weight, bias, a, b, scale)
    y.sum().backward()
    want_y, want_ga, want_gb = _reference(x, weight, bias, a, b, scale)
    assert y.dtype == torch.bfloat16
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per value); sums of 64 products of
    # rounded values err by about that relative to the result's norm, well under 1%.
    assert _rel(y, want_y) < 1e-2
    assert _rel(a.grad, want_ga) < 2e-2 and _rel(b.grad, want_gb) < 2e-2


def test_mixed_dtypes_outside_autocast_are_still_refused() -> None:
    x, weight, bias, a, b = _inputs()
    with pytest.raises(RuntimeError, match="dtype"):
        ops.lora_linear(x.bfloat16(), weight, bias, a, b, 1.0)


@pytest.mark.parametrize(
    ("setting", "flags", "expected"),
    [
        ("auto", {"avx2", "avx512_bf16"}, True),
        ("auto", {"avx2", "amx_bf16"}, True),
        ("auto", {"avx2", "avx512f"}, False),
        ("bf16", {"avx2"}, True),
        ("off", {"avx512_bf16"}, False),
    ],
)
def test_auto_uses_bf16_on_cpus_that_compute_it_natively(
    monkeypatch: pytest.MonkeyPatch, setting: str, flags: set[str], expected: bool
) -> None:
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    assert precision.uses_bf16(setting, CPU) is expected
    line = precision.describe(setting, CPU)
    assert (line is not None) is expected
    if expected and setting == "auto":
        assert line is not None and next(iter(flags & {"avx512_bf16", "amx_bf16"})) in line


def test_cpu_flags_come_from_proc_cpuinfo() -> None:
    flags = cpu_features.cpu_flags()
    # Every x86-64 CPU has SSE2; on other machines (or without /proc) the set is empty.
    assert not flags or "sse2" in flags or "fp" in flags


def _first_losses(tmp_path, model_dir, autocast: str, capsys) -> list[float]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(16)))
    out = tmp_path / f"out-{autocast}"
    argv = ["sft", "--model", str(model_dir), "--data", str(data), "--method", "qlora"]
    argv += ["--out", str(out), "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2"]
    assert main([*argv, "--autocast", autocast]) == 0
    printed = capsys.readouterr().out
    assert ("bf16 autocast on cpu" in printed) is (autocast == "bf16")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_bf16_sft_losses_stay_close_to_float32(tmp_path, capsys) -> None:
    model_dir = saved_model(tmp_path / "tiny")
    full = _first_losses(tmp_path, model_dir, "off", capsys)
    half = _first_losses(tmp_path, model_dir, "bf16", capsys)
    assert len(full) == len(half) == 4
    # Same data and seed; bf16 rounds each matmul's inputs (2^-9 relative), which moves a
    # loss near 3 by a few thousandths; four small steps do not compound that past 2%.
    for f, h in zip(full, half, strict=True):
        assert abs(f - h) / f < 2e-2, (full, half)
