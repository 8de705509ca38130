"""Checkpoints written atomically and read back without pickle.

A checkpoint is a directory ``checkpoint-<step>`` holding

- ``trainable.safetensors``: every parameter that trains, by its name in the model (the adapter
  for LoRA / QLoRA, the whole model for full fine-tuning);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and everything else;
- under FSDP, ``sharded/`` and ``optimizer-rank<r>.json`` instead of the three files above,
  every rank writing its part (:mod:`lorakit.train.sharded_checkpoint`);
- ``rng.safetensors``: the CPU (and CUDA) random generator states; under DDP rank 0's, with
  ``rng-rank<r>.safetensors`` for each other rank (dropout draws differ between ranks);
- ``trainer.json``: step, data position, early-stopping state and the scheduler's state.

It is written under a temporary name and renamed into place, then ``latest`` (a one-line file
naming it) is replaced with ``os.replace``: a run killed at any moment leaves either the previous
checkpoint or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.file_writes import WRITE_ERRORS, write_error, write_text_atomic
from lorakit.peft.files import read_json, read_tensors

LATEST = "latest"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: Path) -> None:
    """Every trainable parameter, keyed by its name in the model, as safetensors."""
    save_file(trainable_state(model), str(path))


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copies saved parameters into ``model``'s trainable parameters of the same names.

    Raises:
        ValueError: the file is corrupt, holds NaN / Inf or integer tensors, or does not fit.
    """
    saved = read_tensors(path)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise ValueError(
            f"{path} does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    for name, tensor in saved.items():
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{path} does not fit the model: {name} has shape {list(tensor.shape)} there, "
                f"{list(params[name].shape)} in the model (other adapter options)"
            )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        rest["state"][str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                rest["state"][str(index)][key] = value
    return tensors, rest


def join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in rest["state"].items()}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state[int(index)][name] = tensor
    # JSON has no tuples; torch.optim keeps betas as one.
    groups = [{**g, "betas": tuple(g["betas"])} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[f"cuda{i}"] for i in range(len(state) - 1)]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def save(
    out: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Writes ``out/checkpoint-<step>`` atomically, points ``latest`` at it, keeps ``keep``.

    ``rng_states``: every rank's :func:`rng_state`, in rank order (default: this process's).
    """
    tmp = staging_dir(out)
    with removed_on_failure(tmp, folder(out, step)):
        save_trainable(model, tmp / "trainable.safetensors")
        tensors, rest = split_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(rest))
    return publish(out, tmp, step, trainer_state, keep, rng_states)


def folder(out: Path, step: int) -> Path:
    """Where the checkpoint of optimizer step ``step`` is published in ``out``."""
    return out / f"checkpoint-{step}"


def staging_dir(out: Path) -> Path:
    """A fresh temporary directory in ``out`` that a checkpoint's tensors are written to before
    :func:`publish` renames it into place."""
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".checkpoint-tmp-", dir=out))


@contextlib.contextmanager
def removed_on_failure(tmp: Path, final: Path) -> Iterator[None]:
    """Deletes staged checkpoint ``tmp`` when writing into it fails, so that a full disk leaves
    no half-written folder, only the earlier checkpoints; the failure names ``final``."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WRITE_ERRORS):
            raise write_error(final, e) from e
        raise


def publish(
    out: Path,
    tmp: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep: int,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Adds the RNG and trainer state to staged checkpoint ``tmp`` (its tensors written), renames
    it to ``out/checkpoint-<step>``, points ``latest`` at it and keeps the ``keep`` latest."""
    final = folder(out, step)
    with removed_on_failure(tmp, final):
        for rank, state in enumerate(rng_states or [rng_state()]):
            save_file(state, str(tmp / _rng_file(rank)))
        (tmp / "trainer.json").write_text(json.dumps(trainer_state))
    if final.exists():  # a rerun of the same step after a crash between rename and `latest`
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(out / LATEST, final.name)
    for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)
    return final


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng-rank{rank}.safetensors"


def latest(out: Path) -> Path | None:
    """The checkpoint ``out/latest`` names, or None without one.

    Raises:
        ValueError: ``latest`` names a checkpoint that is not there.
    """
    pointer = out / LATEST
    if not pointer.exists():
        return None
    path = out / pointer.read_text().strip()
    if not path.name.startswith("checkpoint-") or not path.is_dir():
        raise ValueError(
            f"{pointer} names {path.name!r}, which is not a checkpoint in {out}; "
            "start afresh with --no-resume"
        )
    return path


def remove_all(out: Path) -> None:
    """Deletes every checkpoint in ``out`` and ``latest``: a run that starts afresh must not
    count another run's checkpoints among the ones it keeps."""
    for old in out.glob("checkpoint-*"):
        if old.is_dir():
            shutil.rmtree(old)
    (out / LATEST).unlink(missing_ok=True)


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path`` (``trainer.json``), without loading tensors."""
    return read_json(path / "trainer.json")


def load(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> dict[str, Any]:
    """Restores the model's trainable parameters, the optimizer and rank ``rank``'s RNG; returns
    the trainer state.

    Raises:
        ValueError: a file of the checkpoint is missing or corrupt (the message names it).
    """
    load_trainable(model, path / "trainable.safetensors")
    rest = read_json(path / "optimizer.json")
    tensors = read_tensors(path / "optimizer.safetensors", weights=False)
    try:
        optimizer.load_state_dict(join_optimizer(tensors, rest))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path / 'optimizer.json'} does not fit the optimizer: {e}") from None
    load_rng(path, rank)
    return read_state(path)


def load_rng(path: Path, rank: int) -> None:
    """Restores rank ``rank``'s random generators from checkpoint ``path``."""
    _set_rng_state(read_tensors(path / _rng_file(rank), weights=False))
