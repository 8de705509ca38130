"""torch.distributed as the Trainer uses it: torchrun's process group, and the few collectives
that keep the ranks in step. Outside torchrun (or with one process) every helper is the
single-process identity, so the Trainer has one code path."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets WORLD_SIZE, RANK and LOCAL_RANK in each worker."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Joins torchrun's process group for the duration of the block, then destroys it.

    NCCL for CUDA tensors and gloo for CPU ones where CUDA is available (a run on ``--device
    cpu`` still works there), gloo alone otherwise. Each rank's current CUDA device becomes
    ``LOCAL_RANK``, so ``--device cuda`` (and ``auto``) puts rank r on GPU r of its machine. Does
    nothing outside torchrun or inside a group someone else created.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        init_group("cuda:nccl,cpu:gloo")
    else:
        init_group("gloo")
    try:
        yield
    finally:
        release_group()


def init_group(backend: str, **options: Any) -> None:
    """``dist.init_process_group(backend, **options)``, made safe to tear down.

    ``torch._dynamo`` (which ``DistributedDataParallel`` imports on first use) keeps references
    to the process groups that exist when it is imported. Imported after the group, it keeps the
    group and its gloo threads alive past ``destroy_process_group``, until interpreter shutdown
    tears the threads down mid-finalization and the process aborts at random ("terminate called
    without an active exception"). Imported first, it holds no group.
    """
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend, **options)


def release_group() -> None:
    """Destroys the default process group now, its gloo threads joined before returning.

    ``DistributedDataParallel`` sits in a reference cycle that holds the group until the cyclic
    collector runs; collecting first lets ``destroy_process_group`` free it here.
    """
    gc.collect()
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 writes every file and prints; the others only compute."""
    return rank() == 0


def _reduce_device() -> torch.device:
    # A group made with NCCL alone reduces CUDA tensors only.
    if "gloo" in str(dist.get_backend()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def sum_across(values: list[float]) -> list[float]:
    """Each value summed over the ranks (float64, so token counts stay exact)."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, detached, in its dtype and on its device (``t`` detached
    outside torchrun, so gradients do not depend on the number of processes): the
    :data:`lorakit.losses.ppo.Total` of a batch split over the ranks."""
    if not active():
        return t.detach()
    summed = t.detach().to(_reduce_device(), copy=True)
    dist.all_reduce(summed)
    return summed.to(t.device)


def gather_to_main(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order on rank 0 (an empty list elsewhere)."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * world_size() if is_main() else []
    dist.gather_object(obj, gathered if is_main() else None, dst=0)
    return gathered


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps (``model`` itself when not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def barrier() -> None:
    if active():
        dist.barrier()


def sum_gradients(parameters: list[torch.Tensor]) -> None:
    """Sums the gradients of ``parameters`` over the ranks, in place, in one collective (every
    rank must hold the same parameters with a gradient)."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_reduce_device())
    dist.all_reduce(flat)
    for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(part.view_as(grad))


def same_on_every_rank(values: list[float]) -> bool:
    """Whether every rank passed the same ``values`` (checked on every rank)."""
    if not active():
        return True
    mine = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))
