"""FSDP2 as the Trainer uses it: ``fully_shard`` per decoder layer, then the root, with the
frozen NF4 base sharded too (:class:`~lorakit.nn.NF4Linear` holds it as plain ``uint8``
parameters, one row per block: see :mod:`lorakit.quant.nf4_storage`).

Every parameter becomes a ``DTensor`` sharded along dim 0 over the ranks: rank ``r`` of ``N`` keeps
rows ``[r * ceil(R / N), (r + 1) * ceil(R / N))``, FSDP2 all-gathers a layer's parameters before
it runs and frees them after, and reduce-scatters its gradients (averaged over the ranks, as
DDP's all-reduce is). The base's memory per rank so falls as ``1 / N``, the adapters' and their
optimizer state's too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lorakit.train import distributed


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes that a Hugging Face model names in ``_no_split_modules``
    (its decoder layers), innermost first (FSDP2 shards a module's sub-units before it).

    Raises:
        ValueError: the model names none, or none is in it.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names][::-1]
    if not layers:
        raise ValueError(
            f"--fsdp: {type(model).__name__} names no decoder-layer class (_no_split_modules) "
            "to shard by"
        )
    return layers


def shard(model: nn.Module, device: torch.device) -> None:
    """Shards ``model`` in place over every rank of the process group: each decoder layer is one
    FSDP unit (gathered while it runs), the rest (embeddings, final norm, head) the root's.

    Parameters, frozen or not, of any dtype are sharded. After this, ``model``'s parameters are
    ``DTensor`` s: create the optimizer afterwards.
    """
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduce-scatters gradients (the last micro-batch of a step) or
    only accumulates them unsharded (the earlier ones), as DDP's ``no_sync`` does."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


@contextlib.contextmanager
def whole_trainable(model: nn.Module) -> Iterator[None]:
    """Within the block, every trainable parameter of a sharded ``model`` is whole on every rank
    (a plain tensor), so the adapter writers read it as they do outside FSDP; the shards are put
    back after. Only the trainable parameters are gathered, never the frozen base. Every rank
    must enter the block (it all-gathers)."""
    owners = [
        (module, name, param)
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if param.requires_grad and isinstance(param, DTensor)
    ]
    for module, name, param in owners:
        module._parameters[name] = nn.Parameter(param.detach().full_tensor())
    try:
        yield
    finally:
        for module, name, param in owners:
            module._parameters[name] = param
