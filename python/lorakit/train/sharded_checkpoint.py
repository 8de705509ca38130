"""The tensors of a checkpoint under FSDP, written by every rank with
``torch.distributed.checkpoint`` (DCP) in safetensors.

A checkpoint directory of :mod:`lorakit.train.checkpoint` then holds ``sharded/`` instead of
``trainable.safetensors`` and ``optimizer.*``:

- ``sharded/*.safetensors``: one file per rank, written by that rank (DCP's Hugging Face storage
  writer with ``save_distributed``): its shard of each trainable parameter, under the parameter's
  name, with the shard's offset in the file's metadata, and its optimizer tensors under
  ``optimizer.rank<r>.<index>.<key>``;
- ``optimizer-rank<r>.json``: rank ``r``'s optimizer state other than tensors (steps, groups).

DCP's own file format pickles its metadata; the safetensors writer and reader keep the rule that
no pickle is loaded from a user path. The trainable parameters are saved with their global shape
and offsets, so :func:`load_trainable` reads them onto any number of ranks, one process without a
process group included. The optimizer state is each rank's own (the blockwise 8-bit state is
computed per local shard, so its blocks depend on the sharding): it resumes on as many ranks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from lorakit.peft.files import read_json
from lorakit.train import distributed
from lorakit.train.checkpoint import join_optimizer, split_optimizer

SHARDED = "sharded"


def _optimizer_prefix(rank: int) -> str:
    return f"optimizer.rank{rank}."


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its part of ``model``'s trainable parameters and its optimizer state
    into checkpoint directory ``tmp`` (the same path on every rank: a shared file system)."""
    rank = distributed.rank()
    tensors, rest = split_optimizer(optimizer.state_dict())
    state = {n: p.detach() for n, p in _trainable(model).items()}
    state.update({f"{_optimizer_prefix(rank)}{k}": v for k, v in tensors.items()})
    writer = HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True)
    dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
    (tmp / f"optimizer-rank{rank}.json").write_text(json.dumps(rest))


def _load(path: Path, state: dict[str, torch.Tensor]) -> None:
    reader = HuggingFaceStorageReader(str(path / SHARDED))
    with torch.no_grad(), warnings.catch_warnings():
        # One process without a process group is meant here (loading onto one rank).
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())


def load_trainable(path: Path, model: nn.Module) -> None:
    """Copies checkpoint ``path``'s trainable parameters into ``model``'s (sharded or not, on
    any number of ranks: each reads the rows it holds).

    Raises:
        ValueError: the checkpoint lacks a trainable parameter of the model, or shapes differ.
    """
    params = _trainable(model)
    stored = HuggingFaceStorageReader(str(path / SHARDED)).read_metadata().state_dict_metadata
    missing = [n for n in params if n not in stored]
    if missing:
        raise ValueError(f"{path} does not fit the model: missing {missing[:3]}")
    wrong = [n for n, p in params.items() if stored[n].size != p.shape]  # type: ignore[union-attr]
    if wrong:
        raise ValueError(f"{path} does not fit the model: other shapes for {wrong[:3]}")
    _load(path, {n: p.detach() for n, p in params.items()})


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restores the trainable parameters and this rank's optimizer state from ``path`` (written
    by :func:`save` on as many ranks).

    Raises:
        ValueError: a file is missing, or the state does not fit the model or optimizer.
    """
    load_trainable(path, model)
    rank = distributed.rank()
    prefix = _optimizer_prefix(rank)
    stored = HuggingFaceStorageReader(str(path / SHARDED)).read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)  # type: ignore[union-attr]
        for key, meta in stored.items()
        if key.startswith(prefix)
    }
    _load(path, tensors)
    rest = read_json(path / f"optimizer-rank{rank}.json")
    mine = {key.removeprefix(prefix): value for key, value in tensors.items()}
    try:
        optimizer.load_state_dict(join_optimizer(mine, rest))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path} does not fit the optimizer of rank {rank}: {e}") from None
