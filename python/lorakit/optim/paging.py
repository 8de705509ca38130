"""Paged optimizer state: moments in pinned host memory, streamed through a bounded GPU pool.

bitsandbytes pages with CUDA unified memory, so the driver decides what moves and when, and the
GPU memory it takes is not bounded. Here the paging is explicit: the pool of page slots is the
only GPU memory that paged state ever occupies, so it is budgeted exactly; a page is copied in on
one side stream while the page before it is updated, and copied out on another; and the state
itself is ordinary pinned host tensors, which DDP, ``state_dict`` and checkpoints see as such.

AdamW is elementwise and its 8-bit form blockwise, and pages start on block boundaries, so a
paged step computes exactly what a resident one does (the tests check it bit for bit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.optim.state import local_shard, state_layout

# Pages start at multiples of the 8-bit block, so no quantization block straddles two pages.
_ALIGN = 256
# Each state segment in a slot starts on this many bytes (coalesced, aligned accesses).
_SEGMENT_ALIGN = 256
# A page of 32-bit state at this size moves 32 MiB per copy: large enough that the fixed cost
# of a copy and a launch is noise next to the transfer, small enough to bound the pool.
DEFAULT_SLOT_BYTES = 32 << 20
# torch's CUDA caching allocator rounds every allocation up to a multiple of this.
_ALLOCATION_GRANULE = 512
# Three slots let the copy-out of page i-1 overlap the copy-in of page i+1 while page i is
# updated; two (double buffering) would serialize those two copies.
DEFAULT_SLOTS = 3

Update = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None]


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _segments(numel: int, eightbit: bool) -> list[tuple[str, torch.dtype, int, int]]:
    """(key, dtype, byte offset, numel) of each state tensor of a ``numel``-element page."""
    segments, offset = [], 0
    for key, (dtype, count) in state_layout(numel, eightbit).items():
        segments.append((key, dtype, offset, count))
        offset = _round_up(offset + count * dtype.itemsize, _SEGMENT_ALIGN)
    return segments


def _allocated_bytes(numel: int, eightbit: bool) -> int:
    """Device memory that resident state of ``numel`` elements takes, allocator rounding in."""
    return sum(
        _round_up(dtype.itemsize * count, _ALLOCATION_GRANULE)
        for dtype, count in state_layout(numel, eightbit).values()
    )


def _page_bytes(numel: int, eightbit: bool) -> int:
    _, dtype, offset, count = _segments(numel, eightbit)[-1]
    return offset + count * dtype.itemsize


def page_numel(slot_bytes: int, eightbit: bool) -> int:
    """The most elements (a multiple of 256) whose state fits in a slot of ``slot_bytes``."""
    per_element = sum(d.itemsize for d, _ in state_layout(_ALIGN, eightbit).values()) / _ALIGN
    numel = int(slot_bytes / per_element) // _ALIGN * _ALIGN
    while numel > 0 and _page_bytes(numel, eightbit) > slot_bytes:
        numel -= _ALIGN
    return numel


@dataclass(frozen=True)
class PagedParam:
    """A parameter whose state lives in host memory, and how one page of it is updated."""

    param: torch.Tensor
    state: dict[str, Any]
    eightbit: bool
    update: Update  # (param slice, grad slice, state slices on the device) -> updates in place
    grad: torch.Tensor | None = None  # default: param.grad (a DTensor's local shard has none)


class _Lane:
    """A CUDA stream to order work on, or, on the CPU, the caller's thread (no-op ordering)."""

    def __init__(self, device: torch.device, side: bool) -> None:
        self.stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device) if side else torch.cuda.current_stream(device)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.stream is None:
            yield
        else:
            with torch.cuda.stream(self.stream):
                yield

    def record(self) -> torch.cuda.Event | None:
        return self.stream.record_event() if self.stream is not None else None

    def wait(self, event: torch.cuda.Event | None) -> None:
        if self.stream is not None and event is not None:
            self.stream.wait_event(event)

    def wait_lane(self, other: _Lane) -> None:
        if self.stream is not None and other.stream is not None:
            self.stream.wait_stream(other.stream)


class StatePager:
    """Decides which parameters' state is paged and streams it through a pool of page slots.

    Placement, planned once over all parameters: if all state fits in ``budget_bytes`` it all
    stays resident on the device and nothing is ever copied. Otherwise the pool takes
    ``slots * slot_bytes``, at most half the budget, and the rest keeps the smallest states
    resident (many small tensors would each cost a copy and a launch per step for little
    traffic); the others live in pinned host memory. Device memory for state, counted as torch's
    allocator counts it, never exceeds ``budget_bytes``.

    Args:
        device: the device the parameters are on; on the CPU the "pool" is host memory too,
            which only tests use (``lorakit.optim.AdamW`` never pages CPU parameters).
        budget_bytes: the most device memory that optimizer state may take.
        slots: number of page slots in the pool, at least 2.
        slot_bytes: size of one slot; shrunk so that the pool takes at most half the budget.
    """

    def __init__(
        self,
        device: torch.device,
        budget_bytes: int,
        slots: int = DEFAULT_SLOTS,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
    ) -> None:
        if slots < 2:
            raise ValueError(f"a page pool needs at least 2 slots to overlap copies, got {slots}")
        self.device = device
        self.budget_bytes = budget_bytes
        self.slots = slots
        pool_share = budget_bytes // (2 * slots)
        self.slot_bytes = min(slot_bytes, pool_share) // _ALLOCATION_GRANULE * _ALLOCATION_GRANULE
        self.paged: set[torch.Tensor] = set()
        self._pool: list[torch.Tensor] = []
        self._copy_lanes: tuple[_Lane, _Lane] | None = None  # copy-in, copy-out

    def plan(self, params: list[tuple[torch.Tensor, bool]]) -> None:
        """Chooses, once, which of ``params`` (parameter, has 8-bit state) are paged.

        Raises:
            ValueError: the budget cannot hold even the smallest pool of pages.
        """
        sizes = [(_allocated_bytes(local_shard(p).numel(), eightbit), p) for p, eightbit in params]
        if sum(size for size, _ in sizes) <= self.budget_bytes:
            return
        smallest_page = max(_page_bytes(_ALIGN, e) for e in (False, True))
        if self.slot_bytes < smallest_page:
            raise ValueError(
                f"page_budget_mb={self.budget_bytes / 2**20:.3f} is too small for a pool of "
                f"{self.slots} pages of at least {smallest_page} bytes; raise the budget"
            )
        room = self.budget_bytes - self.slots * self.slot_bytes
        for size, p in sorted(sizes, key=lambda s: s[0]):
            if size <= room:
                room -= size
            else:
                self.paged.add(p)

    def home(self, param: torch.Tensor) -> torch.device:
        """Where ``param``'s state lives: host memory if it is paged, else beside ``param``."""
        return torch.device("cpu") if param in self.paged else param.device

    def _pages(self, item: PagedParam) -> Iterator[tuple[int, int]]:
        step = page_numel(self.slot_bytes, item.eightbit)
        n = item.param.numel()
        for start in range(0, n, step):
            yield start, min(start + step, n)

    @staticmethod
    def _slot_views(slot: torch.Tensor, numel: int, eightbit: bool) -> dict[str, torch.Tensor]:
        return {
            key: slot[offset : offset + count * dtype.itemsize].view(dtype)
            for key, dtype, offset, count in _segments(numel, eightbit)
        }

    @staticmethod
    def _host_views(state: dict[str, Any], start: int, stop: int) -> dict[str, torch.Tensor]:
        views = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                per_block = key.endswith("absmax")  # one float per block of 256 elements
                lo, hi = (start // _ALIGN, -(-stop // _ALIGN)) if per_block else (start, stop)
                views[key] = value.view(-1)[lo:hi]
        return views

    def step(self, items: list[PagedParam]) -> None:
        """Updates every page of ``items``, each through a pool slot, in order.

        Per page: the copy-in lane fills a slot once the slot's previous page has been copied
        out; the caller's stream updates the page once it is in; the copy-out lane writes it
        back once it is updated. When this returns, the caller's stream is ordered after every
        copy-out, so later work on it (and the next step) sees the written-back state.
        """
        if not items:
            return
        if self._copy_lanes is None:
            self._pool = [
                torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                for _ in range(self.slots)
            ]
            self._copy_lanes = (_Lane(self.device, side=True), _Lane(self.device, side=True))
        copy_in, copy_out = self._copy_lanes
        compute = _Lane(self.device, side=False)  # the caller's current stream
        copy_in.wait_lane(compute)  # gradients and earlier steps come first
        written: list[torch.cuda.Event | None] = [None] * self.slots
        page = 0
        for item in items:
            flat_param = item.param.view(-1)
            grad = item.param.grad if item.grad is None else item.grad
            flat_grad = grad.view(-1)  # type: ignore[union-attr]
            for start, stop in self._pages(item):
                slot = page % self.slots
                device_views = self._slot_views(self._pool[slot], stop - start, item.eightbit)
                host_views = self._host_views(item.state, start, stop)
                copy_in.wait(written[slot])
                with copy_in.active():
                    for key, view in device_views.items():
                        view.copy_(host_views[key], non_blocking=True)
                compute.wait(copy_in.record())
                with compute.active():
                    item.update(flat_param[start:stop], flat_grad[start:stop], device_views)
                copy_out.wait(compute.record())
                with copy_out.active():
                    for key, view in device_views.items():
                        host_views[key].copy_(view, non_blocking=True)
                written[slot] = copy_out.record()
                page += 1
        compute.wait_lane(copy_out)

    def synchronize(self) -> None:
        """Waits until every copy has landed, before host code reads or writes the state."""
        if self.device.type == "cuda" and self._pool:
            torch.cuda.synchronize(self.device)
