"""How lorakit was built, what it refuses to load with, and `lorakit info`."""

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


def test_info_prints_how_lorakit_was_built(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    info = lorakit.build_info()
    assert f"version: {info.version}" in out
    assert f"cpu_isas: {info.cpu_isas}" in out
