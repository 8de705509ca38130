"""The CPU kernels' instruction-set levels: the level picked for this CPU, the LORAKIT_CPU_ISA
override and its mistakes, and every level's kernels agreeing with the portable ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import build_info, cpu_isa
from lorakit._native import _C, CPU_ISA_LEVELS, available_cpu_isas, detected_cpu_isa, x86_kernels
from lorakit.cpu_features import cpu_flags

ROOT = Path(__file__).resolve().parent.parent
LEVELS = available_cpu_isas()
# What each level needs, as /proc/cpuinfo names the flags (an independent view of the CPU).
LEVEL_FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_bf16": {"avx512_bf16"},
}


def _run(code: str, level: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs Python code (or, with args, a script) with LORAKIT_CPU_ISA set to level (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_CPU_ISA"}
    if level is not None:
        env["LORAKIT_CPU_ISA"] = level
    command = [sys.executable, code, *args] if args else [sys.executable, "-c", code]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(bool(_C.avx512_on_simde), reason="a SIMDe build reports every level")
@pytest.mark.skipif(not x86_kernels(), reason="a portable build has the scalar level only")
def test_detected_level_matches_the_cpu_flags():
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    expected = "scalar"
    for level, needs in LEVEL_FLAGS.items():
        if not needs <= flags:
            break
        expected = level
    assert detected_cpu_isa() == expected


def test_default_is_the_detected_level():
    out = _run("import lorakit; print(lorakit.cpu_isa(), lorakit.build_info().cpu_isa)", None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [detected_cpu_isa()] * 2


@pytest.mark.parametrize("level", LEVELS)
def test_every_supported_level_can_be_forced(level):
    out = _run("import lorakit; print(lorakit.cpu_isa())", level)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == level


def test_the_running_level_is_reported():
    assert cpu_isa() == (os.environ.get("LORAKIT_CPU_ISA") or detected_cpu_isa())
    assert build_info().cpu_isa == cpu_isa()


def _refusal(level: str) -> str:
    # The first op call fails too, with the same one line (no kernel runs at a level it lacks).
    code = (
        "import torch, lorakit\n"
        "packed, absmax = lorakit.ops.nf4_quantize(torch.ones(64))\n"
        "dequantize = lambda: lorakit.ops.nf4_dequantize(packed, absmax, 64, (64,), torch.float)\n"
        "for call in (lorakit.cpu_isa, dequantize):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        print(e)\n"
    )
    out = _run(code, level)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    return lines[0]


def test_an_unknown_level_is_refused_in_one_line():
    assert _refusal("avx1024") == (
        "LORAKIT_CPU_ISA='avx1024' is no level; use one of scalar, avx2, avx512, avx512_bf16"
    )


@pytest.mark.skipif(LEVELS == CPU_ISA_LEVELS, reason="this CPU has every level")
@pytest.mark.skipif(not x86_kernels(), reason="a portable build refuses every x86 level")
def test_a_level_above_the_cpu_is_refused_in_one_line():
    above = CPU_ISA_LEVELS[len(LEVELS)]
    assert _refusal(above) == (
        f"LORAKIT_CPU_ISA={above} asks for more than this CPU has (it supports up to {LEVELS[-1]})"
    )


@pytest.mark.skipif(x86_kernels(), reason="this build has the x86 kernels")
@pytest.mark.parametrize("level", CPU_ISA_LEVELS[1:])
def test_a_portable_build_runs_the_scalar_kernels_only(level):
    # Whatever the CPU has: the x86 copies are not in the module.
    assert detected_cpu_isa() == "scalar"
    assert build_info().cpu_isas == ("scalar",)
    assert _refusal(level) == (
        f"LORAKIT_CPU_ISA={level} asks for more than this build has "
        "(it has only the portable scalar kernels)"
    )


@pytest.fixture(scope="module")
def results_by_level(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    results = {}
    for level in LEVELS:
        path = tmp_path_factory.mktemp("isa") / f"{level}.pt"
        out = _run("tests/cpu_isa_probe.py", level, str(path))
        assert out.returncode == 0, out.stderr
        results[level] = torch.load(path)
    return results


# Each level's kernels against the portable ones. Exact where every level computes the same
# float32 operations in the same order (lookups of the same table; AdamW without FMA contraction,
# as torch rounds). Close where the sums run in another order (the decode kernels, the row
# kernel's lane count) or round the NF4 codes to bfloat16 (the avx2 and avx512_bf16 decode kernels
# for bfloat16 input): a few float32 ulps, or one or two ulps of a half / bfloat16 result.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU runs the portable kernels only")
@pytest.mark.parametrize("level", LEVELS[1:])
def test_every_level_agrees_with_the_portable_kernels(level, results_by_level):
    portable, vector = results_by_level["scalar"], results_by_level[level]
    assert bytes(vector["level"].tolist()).decode() == level
    assert vector.keys() == portable.keys()
    for key in portable.keys() - {"level"}:
        got, expected = vector[key], portable[key]
        if key.startswith(("nf4_dequantize", "adamw")):
            assert torch.equal(got, expected), key
        else:  # keys end with the dtype the op ran in
            tol = next(t for dtype, t in TOLERANCE.items() if key.endswith(str(dtype)))
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=key)
