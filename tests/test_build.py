"""How lorakit was built, what it refuses to load with, and the command line."""

import re

import pytest
import torch

import lorakit
from lorakit import _native
from lorakit.cli import main

OPS = [
    "nf4_quantize",
    "nf4_dequantize",
    "blockwise8_quantize",
    "blockwise8_dequantize",
    "lora_linear",
    "lora_linear_backward",
    "lora_linear_nf4",
    "lora_linear_nf4_backward",
]


def test_build_info_describes_this_build() -> None:
    info = lorakit.build_info()
    assert info.torch_version == torch.__version__.split("+")[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info.version)
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lorakit::{op}", "CPU")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"lorakit::{op}", "CUDA")
        assert has_cuda == info.cuda_compiled
    assert bool(info.cuda_archs) == info.cuda_compiled


def test_torch_version_mismatch_is_refused_with_a_rebuild_hint(monkeypatch) -> None:
    monkeypatch.setattr(_native._config, "TORCH_VERSION", "2.0.0")
    with pytest.raises(ImportError, match=r"built against torch 2\.0\.0 .*pip install"):
        _native._load()


def test_demo_reports_memory(capsys) -> None:
    assert main(["demo", "--hidden", "256", "--layers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    bits = float(re.search(r"NF4, ([\d.]+) bits/parameter", out).group(1))
    # 4 bits + 8-bit scales per 64 (0.125) + float32 per 16384 (0.002) + code tables, which at
    # this tiny size (0.5M parameters, 7 matrices) still add ~0.1 bit.
    assert 4.12 < bits < 4.3
    assert "MiB" in out


def test_cli_user_error_is_one_line_and_nonzero(capsys) -> None:
    assert main(["demo", "--hidden", "256", "--layers", "1", "--blocksize", "48", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "blocksize must be one of" in err and "Traceback" not in err
