"""Every CUDA kernel under the CPU emulation (scripts/emulate_cuda.sh), and proof that the
emulator catches the bugs it exists for: a wrong shuffle offset, a shuffle mask that leaves out a
caller, a missing barrier, a divergent barrier, an oversized block."""

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "emulation"))
from emulated import Emulated, KernelError
from run_emulated import KERNELS

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "emulate_cuda.sh")
BLOCK = 256  # the check kernels' block size (kThreads in emulation/emulator_checks.cpp)


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        [SCRIPT, *args], env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.fixture(scope="module")
def emu() -> Emulated:
    built = run_script("--build-only")
    assert built.returncode == 0, built.stdout + built.stderr
    return Emulated()


def test_every_kernel_matches_the_cpu_kernels(emu: Emulated) -> None:
    result = run_script()
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[-1] == f"{len(KERNELS)} passed, 0 failed"
    assert len(lines) == len(KERNELS) + 1 and all(line.startswith("ok ") for line in lines[:-1])


def integers(n: int) -> torch.Tensor:
    """Random small integers as float32: every sum of them is exact, in any order. Fresh values
    on each call, so shared memory left over from an earlier launch never holds the answer."""
    return torch.randint(-1000, 1000, (n,)).float()


def test_correct_kernels_give_the_right_answers(emu: Emulated) -> None:
    x = integers(2 * BLOCK)
    sums = emu.check_kernel("warp_sum", 2, BLOCK, x)[: x.numel() // 32]
    assert torch.equal(sums, x.view(-1, 32).sum(dim=1))
    reversed_ = emu.check_kernel("block_reverse", 2, BLOCK, x)
    assert torch.equal(reversed_, x.view(2, BLOCK).flip(1).reshape(-1))


def test_shuffle_up_down_and_index_with_widths(emu: Emulated) -> None:
    x = integers(2 * BLOCK)
    scan = emu.check_kernel("warp_scan", 2, BLOCK, x)
    assert torch.equal(scan, x.view(-1, 32).cumsum(dim=1).reshape(-1))
    got = emu.check_kernel("group8_broadcast_and_sum", 2, BLOCK, x).view(-1, 8)
    groups = x.view(-1, 8)
    expected = groups[:, 3:4].expand(-1, 8).clone()
    expected[:, 0] += 1000 * groups.sum(dim=1)
    assert torch.equal(got, expected)


def test_returned_threads_count_as_arrived_and_atomics_are_atomic(emu: Emulated) -> None:
    # Half the threads return before the barrier; the others add 1 before and after it. Blocks
    # run on several OS threads, so the float atomicAdd must be a real atomic.
    blocks = 64
    count = emu.check_kernel("count_after_early_return", blocks, BLOCK, torch.zeros(1))
    assert count.item() == blocks * BLOCK


def test_a_wrong_shuffle_offset_gives_wrong_sums(emu: Emulated) -> None:
    x = integers(2 * BLOCK)
    sums = emu.check_kernel("warp_sum_wrong_offset", 2, BLOCK, x)[: x.numel() // 32]
    assert not torch.equal(sums, x.view(-1, 32).sum(dim=1))


def test_a_shuffle_mask_that_leaves_out_a_caller_is_an_error(emu: Emulated) -> None:
    with pytest.raises(KernelError, match=r"warp_sum_wrong_mask block \(\d,0,0\): thread 16 .*"
                       r"mask 0xffff, which leaves itself out"):  # fmt: skip
        emu.check_kernel("warp_sum_wrong_mask", 2, BLOCK, integers(2 * BLOCK))


def test_a_missing_barrier_gives_wrong_values(emu: Emulated) -> None:
    # Threads run in order, so the first half reads the second half's slots before they are
    # written: the kernel returns stale shared memory instead of x reversed.
    x = integers(2 * BLOCK)
    got = emu.check_kernel("block_reverse_missing_barrier", 2, BLOCK, x)
    assert not torch.equal(got, x.view(2, BLOCK).flip(1).reshape(-1))


def test_a_divergent_barrier_is_an_error_not_a_hang(emu: Emulated) -> None:
    with pytest.raises(KernelError, match=r"block_reverse_divergent_barrier block \(\d,0,0\): "
                       r"divergent __syncthreads: thread 0 .* waits at emulator_checks.cpp:\d+, "
                       r"thread 32 .* at emulator_checks.cpp:\d+"):  # fmt: skip
        emu.check_kernel("block_reverse_divergent_barrier", 2, BLOCK, integers(2 * BLOCK))


def test_a_block_of_more_than_1024_threads_is_refused(emu: Emulated) -> None:
    with pytest.raises(KernelError, match=r"warp_sum: invalid launch: block \(2048,1,1\)"):
        emu.check_kernel("warp_sum", 1, 2048, integers(2048))


def test_half_and_bfloat16_conversions_match_torch(emu: Emulated) -> None:
    # Every 16-bit pattern widens exactly; random float32 bit patterns (all exponents, NaN, Inf,
    # subnormals) and halfway cases narrow with round to nearest even, as torch rounds.
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    floats = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), dtype=torch.int32).view(torch.float32)
    halfway = torch.tensor([65520.0, 65519.0, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2**-11])
    floats = torch.cat([floats, halfway, -halfway])
    for dtype, widen, narrow in [
        (torch.float16, "emu_half2float", "emu_float2half"),
        (torch.bfloat16, "emu_bfloat162float", "emu_float2bfloat16"),
    ]:
        wide = emu.convert(widen, every, torch.float32)
        expected = every.view(dtype).float()
        assert torch.equal(wide.isnan(), expected.isnan())
        assert torch.equal(
            wide[~wide.isnan()].view(torch.int32), expected[~expected.isnan()].view(torch.int32)
        )
        narrow_bits = emu.convert(narrow, floats, torch.int16).view(dtype)
        expected = floats.to(dtype)
        assert torch.equal(narrow_bits.isnan(), expected.isnan())
        keep = ~expected.isnan()
        assert torch.equal(narrow_bits[keep].view(torch.int16), expected[keep].view(torch.int16))
