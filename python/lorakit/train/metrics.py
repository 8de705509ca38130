"""Metrics as JSON lines, memory in use, and the loss-curve plot."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lorakit.file_writes import append_text, open_for_append, write_atomic, write_text_atomic


class MetricsLog:
    """Appends one JSON object per record to ``path`` (kept open; flushed every record), and with
    ``report_to="tensorboard"`` writes every numeric field as a TensorBoard scalar too, under
    ``path``'s directory in ``tensorboard/`` (``torch.utils.tensorboard``).

    Args:
        path: the JSON-lines file.
        report_to: ``"none"`` or ``"tensorboard"``.
        start_step: the step a resumed run continues from: TensorBoard events of later steps
            (written before the interruption) are purged, as the JSON lines are.
    """

    def __init__(self, path: Path, report_to: str = "none", start_step: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open_for_append(path)
        self._board = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._file.close()
                raise ValueError(
                    "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self._board = SummaryWriter(str(path.parent / "tensorboard"), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (a line torn by a full disk is dropped when the file is read).

        Raises:
            OSError: the write failed (the message names the file).
        """
        append_text(self._file, self.path, json.dumps(record) + "\n")
        if self._board is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(name, value, record["step"])
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def read(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file. A last line that is not JSON is dropped: it is a record
    that a killed run was writing.

    Raises:
        ValueError: an earlier line is not a JSON object (the message names file and line).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {number} is not a metrics record")
        records.append(record)
    return records


def rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    """Replaces ``path`` with ``records`` atomically (a crash leaves the old file or the new)."""
    write_text_atomic(path, "".join(f"{json.dumps(r)}\n" for r in records))


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def plot_metrics(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """One panel per metric the records hold (loss first, then the objective's own, e.g. reward
    accuracy), each with its training values per step and its validation values (``val_<name>``)
    where evaluated, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    bookkeeping = {"step", "lr", "grad_norm", "tokens_per_s", "memory_mib"}
    names = list(dict.fromkeys(k for r in records for k in r if k not in bookkeeping))
    names = [n for n in names if not n.startswith("val_")] or ["loss"]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        train = [(r["step"], r[name]) for r in records if name in r]
        val = [(r["step"], r[f"val_{name}"]) for r in records if f"val_{name}" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (per counted token or pair)" if name == "loss" else name)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:]))
    finally:
        plt.close(fig)
