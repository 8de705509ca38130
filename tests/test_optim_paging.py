"""Paged optimizer state: the page mechanics (on the CPU, where the pool is host memory too),
the placement plan, and AdamW(paged=True), which must compute exactly what resident state does."""

import functools
from typing import Any

import pytest
import torch

from conftest import bits
from lorakit.optim import AdamW
from lorakit.optim.adamw import fused_step
from lorakit.optim.paging import PagedParam, StatePager, page_numel
from lorakit.optim.state import new_state, state_bytes
from lorakit.quant import dynamic_map

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
CODES = (dynamic_map(True), dynamic_map(False))


def _update(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], step: int) -> None:
    fused_step(param, grad, state, {**HYPER, "step": step}, CODES)


@pytest.mark.parametrize("eightbit", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_steps_equal_resident_steps_bitwise(eightbit: bool, dtype: torch.dtype) -> None:
    # Slots of 4 KiB hold 512 (32-bit) or 1792 (8-bit) elements, so these sizes take one partial
    # page, several whole pages, and many pages with a tail that is not a multiple of 256.
    sizes = [300, 3584, 20_001]
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in sizes]
    reference = [p.detach().clone() for p in params]
    paged_states = [new_state(p, eightbit, torch.device("cpu")) for p in params]
    ref_states = [new_state(p, eightbit, torch.device("cpu")) for p in params]
    # step() pages whatever it is given; plan() (tested below) chooses what that is.
    pager = StatePager(torch.device("cpu"), budget_bytes=6 * 4096, slots=3, slot_bytes=4096)
    everything = list(zip(params, reference, paged_states, ref_states, strict=True))
    for step in range(1, 6):
        items = []
        for p, ref, state, ref_state in everything:
            p.grad = torch.randn(p.shape, dtype=dtype)
            _update(ref, p.grad, ref_state, step)
            items.append(PagedParam(p, state, eightbit, functools.partial(_update, step=step)))
        pager.step(items)
    for p, ref, state, ref_state in everything:
        assert torch.equal(bits(p.detach()), bits(ref))
        for key in ref_state:
            if key != "step":
                assert torch.equal(state[key], ref_state[key]), key


@pytest.mark.parametrize("eightbit", [False, True])
@pytest.mark.parametrize("slot_bytes", [2048, 4096, 10_000, 32 << 20])
def test_page_size_is_block_aligned_and_fits_its_slot(eightbit: bool, slot_bytes: int) -> None:
    n = page_numel(slot_bytes, eightbit)
    assert n > 0 and n % 256 == 0
    # The page's state plus the 256-byte alignment of each of its (2 or 4) segments fits.
    segments = 4 if eightbit else 2
    assert state_bytes(n, eightbit) <= slot_bytes
    assert state_bytes(n + 256, eightbit) > slot_bytes - segments * 256


def _plan(budget: int, sizes: list[int], eightbit: bool = False) -> tuple[StatePager, list]:
    params = [torch.zeros(n) for n in sizes]
    pager = StatePager(torch.device("cpu"), budget, slots=2, slot_bytes=4096)
    pager.plan([(p, eightbit) for p in params])
    return pager, params


def test_plan_keeps_everything_resident_when_it_fits() -> None:
    # Two float32 moments each, every allocation rounded up to 512 bytes as torch's allocator does.
    pager, params = _plan(budget=2 * 16_384 + 2 * 24_064, sizes=[4000, 6000])
    assert not pager.paged
    assert all(pager.home(p) == torch.device("cpu") for p in params)


def test_plan_pages_the_largest_and_stays_within_the_budget() -> None:
    sizes = [100, 5000, 200, 9000, 300]
    budget = 4 * 4096  # a pool of 2 slots of 4 KiB and 8 KiB for resident state
    pager, params = _plan(budget, sizes)
    assert pager.slot_bytes == 4096
    paged = {p.numel() for p in pager.paged}
    # Allocations are rounded up to 512 bytes: the three small ones take 2x(512 + 1024 + 1536)
    # = 6144 bytes and stay resident; the others are paged.
    assert paged == {5000, 9000}
    resident = sum(state_bytes(p.numel(), False) for p in params if p not in pager.paged)
    assert resident + pager.slots * pager.slot_bytes <= budget


def test_plan_refuses_a_budget_too_small_for_a_pool() -> None:
    with pytest.raises(ValueError, match=r"page_budget_mb=.* too small"):
        _plan(budget=1000, sizes=[100_000])


def test_pool_needs_two_slots() -> None:
    with pytest.raises(ValueError, match="at least 2 slots"):
        StatePager(torch.device("cpu"), 1 << 20, slots=1)


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="page_budget_mb must be > 0"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], paged=True, page_budget_mb=0)


def test_paging_is_a_no_op_on_the_cpu() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(a.detach().clone())
    paged = AdamW([a], lr=1e-2, state_bits=8, paged=True, page_budget_mb=0.001)
    resident = AdamW([b], lr=1e-2, state_bits=8)
    for _ in range(3):
        g = torch.randn(5000)
        a.grad, b.grad = g.clone(), g.clone()
        paged.step()
        resident.step()
    assert torch.equal(a, b)
    assert not paged._pagers
    assert paged.state[a]["exp_avg"].device.type == "cpu"


# ---- on a GPU: the real thing ----------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_params(sizes: list[int], dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype, generator=gen)) for n in sizes
    ]


def _set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", dtype=p.dtype, generator=gen)


@cuda
@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paged_equals_resident_bitwise(state_bits: int, dtype: torch.dtype) -> None:
    sizes = [1_000_003, 3000, 2_500_000]
    paged_params, resident_params = _cuda_params(sizes, dtype), _cuda_params(sizes, dtype)
    # 2 MiB: a pool of 3 slots of ~0.67 MiB, so the large tensors take many pages.
    paged = AdamW(paged_params, lr=1e-3, state_bits=state_bits, paged=True, page_budget_mb=2)
    resident = AdamW(resident_params, lr=1e-3, state_bits=state_bits)
    for step in range(1, 8):
        _set_grads(paged_params, step)
        _set_grads(resident_params, step)
        paged.step()
        resident.step()
    pager = paged._pagers[torch.device("cuda", torch.cuda.current_device())]
    assert {p.numel() for p in pager.paged} == {1_000_003, 2_500_000}
    for p, r in zip(paged_params, resident_params, strict=True):
        assert torch.equal(bits(p.detach()), bits(r.detach()))
        ours, theirs = paged.state[p], resident.state[r]
        assert ours["exp_avg"].device.type == ("cpu" if p in pager.paged else "cuda")
        for key in theirs:
            if key != "step":
                assert torch.equal(ours[key].cuda(), theirs[key]), key


@cuda
@pytest.mark.parametrize("state_bits", [32, 8])
def test_cuda_paged_state_stays_under_the_budget(state_bits: int) -> None:
    budget_mb = 16
    params = _cuda_params([8_000_000] * 4)  # 256 MB of 32-bit state, 64 MB of 8-bit
    _set_grads(params, 1)
    opt = AdamW(params, lr=1e-3, state_bits=state_bits, paged=True, page_budget_mb=budget_mb)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    # The dynamic maps (2 KiB) are the only other allocation of the step.
    assert torch.cuda.max_memory_allocated() - before <= budget_mb * 2**20 + 4096
    assert all(s["exp_avg"].is_pinned() for s in opt.state.values())


@cuda
def test_cuda_unlimited_budget_copies_nothing() -> None:
    params = _cuda_params([100_000, 5000])
    _set_grads(params, 1)
    opt = AdamW(params, paged=True, page_budget_mb=float("inf"))
    opt.step()
    assert not opt._pagers and all(s["exp_avg"].is_cuda for s in opt.state.values())
    roomy = AdamW(params, paged=True, page_budget_mb=64)  # all state fits: stays resident
    roomy.step()
    assert all(s["exp_avg"].is_cuda for s in roomy.state.values())


@cuda
@pytest.mark.parametrize("state_bits", [32, 8])
def test_cuda_paged_state_dict_round_trips_both_ways(state_bits: int) -> None:
    sizes = [1_000_000, 700_000]
    paged_params, resident_params = _cuda_params(sizes), _cuda_params(sizes)
    kwargs = {"lr": 1e-3, "state_bits": state_bits}
    paged = AdamW(paged_params, paged=True, page_budget_mb=1, **kwargs)
    resident = AdamW(resident_params, **kwargs)
    for step in range(1, 4):
        _set_grads(paged_params, step)
        _set_grads(resident_params, step)
        paged.step()
        resident.step()
    # Swap: the resident state continues paged and the paged state continues resident.
    into_paged = AdamW(resident_params, paged=True, page_budget_mb=1, **kwargs)
    into_paged.load_state_dict(resident.state_dict())
    into_resident = AdamW(paged_params, **kwargs)
    into_resident.load_state_dict(paged.state_dict())
    assert all(s["exp_avg"].is_pinned() for s in into_paged.state.values())
    for step in range(4, 7):
        _set_grads(paged_params, step)
        _set_grads(resident_params, step)
        into_paged.step()
        into_resident.step()
    for p, r in zip(paged_params, resident_params, strict=True):
        assert torch.equal(p, r)
