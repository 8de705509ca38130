"""How the frozen base under a saved LoRA adapter was held: ``lorakit_base.json`` beside the
PEFT files (PEFT ignores it). A QLoRA adapter learns against the NF4-rounded weights, so it is
continued (``lorakit grpo / ppo --init-adapter``) on the base quantized the same way, and a LoRA
adapter on the dense base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.nn import NF4Linear
from lorakit.peft.files import read_json, write_json

BASE_NAME = "lorakit_base.json"


def base_record(bases: list[nn.Module]) -> dict[str, Any]:
    """``{"quantize": "nf4", "blocksize", "double_quant"}`` when every base is NF4 alike,
    ``{"quantize": None}`` when none is; ``{}`` (nothing to record) for a mix."""
    kinds = {(b.blocksize, b.double_quant) if isinstance(b, NF4Linear) else None for b in bases}
    if len(kinds) != 1:
        return {}
    kind = kinds.pop()
    if kind is None:
        return {"quantize": None}
    return {"quantize": "nf4", "blocksize": kind[0], "double_quant": kind[1]}


def write_base_record(out: Path, bases: list[nn.Module]) -> None:
    """Writes :func:`base_record` of ``bases`` to ``out`` (for a mix, removes an older one)."""
    record = base_record(bases)
    if record:
        write_json(out / BASE_NAME, record)
    else:
        (out / BASE_NAME).unlink(missing_ok=True)


def read_base_record(folder: Path) -> dict[str, Any] | None:
    """The record in adapter ``folder``, or None when it has none (a PEFT adapter, a mix).

    Raises:
        ValueError: the file is not a record lorakit wrote.
    """
    path = folder / BASE_NAME
    if not path.exists():
        return None
    record = read_json(path)
    quantize, blocksize, double_quant = (
        record.get(k) for k in ("quantize", "blocksize", "double_quant")
    )
    if quantize is None or (
        quantize == "nf4" and isinstance(blocksize, int) and isinstance(double_quant, bool)
    ):
        return record
    raise ValueError(f"{path} is not a base record lorakit wrote: {record!r}")
