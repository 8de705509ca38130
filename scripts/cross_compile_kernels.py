"""Cross-compiles the torch-free translation units of a lorakit build for another CPU with zig's
clang (``python -m ziglang c++``), with the flags CMake gave them in that build.

Torch-free: none of the file's headers (as ninja recorded them) is from ATen, torch's C++ API or
pybind11; c10's exception header, which cpu_isa.cpp uses, is allowed. Those are the CPU kernels
and the instruction-set detection: the code that could hold something specific to x86. The other
files are glue over torch, whose headers take minutes each to parse for another target.
Usage: python scripts/cross_compile_kernels.py BUILD_DIR TARGET (e.g. aarch64-linux-gnu), with a
Python that has the ziglang package, and the build's ninja on PATH. Exits 1 if a file fails to
compile or none is torch-free (the selection went wrong).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCH_HEADERS = ("/ATen/", "/torch/csrc/", "/pybind11/", "/torch/library.h", "/Python.h")


def _deps(build: Path, obj: str) -> list[str]:
    out = subprocess.run(
        ["ninja", "-C", str(build), "-t", "deps", obj], capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    # "obj: #deps N, deps mtime M (VALID)"; anything else (STALE, no record) says nothing about
    # what the file includes, and an unknown file must not pass for a torch-free one.
    if not lines or "(VALID)" not in lines[0]:
        raise SystemExit(f"ninja has no valid dependency record of {obj}: rebuild {build} first")
    return [line.strip() for line in lines[1:] if line.strip()]


def _flags(command: str) -> list[str]:
    """The compile command's options, less the compiler, its input and its output."""
    args = shlex.split(command)[1:]
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-o", "-c", "-MT", "-MF"):
            skip = True
        elif arg != "-MD":
            kept.append(arg)
    return kept


def main(build: Path, target: str) -> int:
    entries = json.loads((build / "compile_commands.json").read_text())
    zig = [sys.executable, "-m", "ziglang", "c++", "-target", target]
    checked, failed = 0, 0
    with tempfile.TemporaryDirectory() as out:
        for entry in entries:
            obj = str(Path(entry["output"]).relative_to(build))
            if any(h in dep for dep in _deps(build, obj) for h in TORCH_HEADERS):
                continue
            start = time.monotonic()
            run = subprocess.run(
                [*zig, *_flags(entry["command"]), "-c", entry["file"], "-o", f"{out}/tu.o"],
                cwd=entry["directory"],
                capture_output=True,
                text=True,
            )
            name = Path(entry["file"]).relative_to(Path(__file__).resolve().parent.parent)
            status = "ok" if run.returncode == 0 else "FAILED"
            print(f"{target}: {name} {status} ({time.monotonic() - start:.1f} s)")
            if run.returncode != 0 or run.stderr:
                print(run.stderr, end="")
            checked += 1
            failed += run.returncode != 0
    if not checked:
        print(f"{target}: no torch-free file in {build}", file=sys.stderr)
    return 1 if failed or not checked else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve(), sys.argv[2]))
