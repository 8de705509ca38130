"""Loads the compiled extension and says how it was built and which CPU kernels it runs.

Importing ``lorakit._C`` registers every ``torch.ops.lorakit`` op. A module compiled against one
torch release does not load (or worse, misbehaves) under another, so the torch version recorded at
build time is checked first and a mismatch gets an error that says how to rebuild.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

import torch

REBUILD_HINT = "rebuild lorakit against the installed torch: pip install --no-build-isolation ."


def _torch_release(full_version: str) -> str:
    return full_version.split("+")[0]


def _load() -> tuple[ModuleType, ModuleType]:
    try:
        config = importlib.import_module("lorakit._build_config")
    except ImportError as e:
        raise ImportError(f"lorakit's native module is not built; {REBUILD_HINT}") from e
    running = _torch_release(torch.__version__)
    if config.TORCH_VERSION != running:
        raise ImportError(
            f"lorakit was built against torch {config.TORCH_VERSION} but torch {running} is "
            f"installed; the C++ ABI differs between releases, so {REBUILD_HINT}"
        )
    try:
        native = importlib.import_module("lorakit._C")
    except ImportError as e:
        raise ImportError(f"lorakit's native module failed to load ({e}); {REBUILD_HINT}") from e
    return config, native


_config, _C = _load()

# The CPU kernels' instruction-set levels, lowest first (csrc/common/cpu_isa.h).
CPU_ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels run at: the highest this CPU supports, or the one
    the environment variable ``LORAKIT_CPU_ISA`` forces (one of :data:`CPU_ISA_LEVELS`, at most the
    detected one; ValueError otherwise), so that every kernel variant can be tested on one machine.
    """
    return str(_C.cpu_isa())


def detected_cpu_isa() -> str:
    """The highest instruction-set level of :data:`CPU_ISA_LEVELS` this CPU supports and this
    build has: ``scalar`` in a build without the x86 kernels (:func:`x86_kernels`)."""
    return str(_C.detected_cpu_isa())


def x86_kernels() -> bool:
    """Whether this build has the x86 (AVX2, AVX-512) copies of the CPU kernels: False on other
    CPUs (aarch64 ...) and in a build made with ``-DLORAKIT_X86_KERNELS=OFF``, which run the
    portable ``scalar`` copies only."""
    return bool(_C.x86_kernels)


def available_cpu_isas() -> tuple[str, ...]:
    """Every level this CPU and build can run, lowest first: the values ``LORAKIT_CPU_ISA``
    accepts."""
    return CPU_ISA_LEVELS[: CPU_ISA_LEVELS.index(detected_cpu_isa()) + 1]


@dataclass(frozen=True)
class BuildInfo:
    """How this lorakit was built.

    Attributes:
        version: the lorakit package version.
        torch_version: the torch release the native module was compiled against.
        torch_cuda_version: CUDA version of that torch ("" for a CPU-only torch).
        cuda_compiled: whether the CUDA kernels were compiled in.
        cuda_archs: the SM architectures they were compiled for, e.g. ("80", "90").
        cpu_isa: the instruction-set level the CPU kernels run at (:func:`cpu_isa`).
        cpu_isas: every level this CPU and build can run (:func:`available_cpu_isas`).
        x86_kernels: whether the x86 copies of the CPU kernels were compiled in
            (:func:`x86_kernels`).
    """

    version: str
    torch_version: str
    torch_cuda_version: str
    cuda_compiled: bool
    cuda_archs: tuple[str, ...]
    cpu_isa: str
    cpu_isas: tuple[str, ...]
    x86_kernels: bool


def build_info() -> BuildInfo:
    """Returns the package version, torch version built against and the compiled CUDA archs."""
    try:
        package_version = version("lorakit")
    except PackageNotFoundError:  # a development build run from the source tree
        package_version = "0.0.0+dev"
    return BuildInfo(
        version=package_version,
        torch_version=_config.TORCH_VERSION,
        torch_cuda_version=_config.TORCH_CUDA_VERSION,
        cuda_compiled=bool(_C.with_cuda),
        cuda_archs=tuple(_config.CUDA_ARCHS),
        cpu_isa=cpu_isa(),
        cpu_isas=available_cpu_isas(),
        x86_kernels=x86_kernels(),
    )
