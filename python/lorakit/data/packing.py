"""Packing several examples into one row, and rows into padded batches.

A packed row holds several examples back to back, with position ids restarting at 0 at each
one. Given position ids and no attention mask, transformers' attention (eager, SDPA and flash)
finds the restarts and lets each token attend only within its own example (``masking_utils.
find_packed_sequence_indices``), so a packed row computes exactly what the examples would
separately; the tests check it. The model must be called with ``use_cache=False``, since a
cache turns that detection off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.encode import IGNORE, Example


@dataclass(frozen=True)
class Row:
    """One row of a batch: an example, or several packed."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @classmethod
    def of(cls, example: Example) -> Row:
        return cls(example.input_ids, example.labels, list(range(len(example))))

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: Sequence[Example], length: int) -> list[Row]:
    """Packs examples in order into rows of at most ``length`` tokens.

    An example that does not fit in the current row starts the next one (examples are never
    split, so every example keeps its whole context). Examples longer than ``length`` must have
    been truncated or split before.
    """
    rows: list[Row] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        if len(ex) > length:
            raise ValueError(f"an example of {len(ex)} tokens is longer than the row ({length})")
        if len(ids) + len(ex) > length:
            rows.append(Row(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids += ex.input_ids
        labels += ex.labels
        positions += range(len(ex))
    if ids:
        rows.append(Row(ids, labels, positions))
    return rows


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads rows on the right into ``input_ids``, ``labels`` and ``position_ids`` (batch, n).

    No attention mask is needed: attention is causal and the padding comes after every real
    token, so no real token sees it; its labels are :data:`IGNORE`. Its position ids continue
    the last example's, so padding never looks like the start of another packed example.
    """
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r)
        ids[i, :k] = torch.tensor(r.input_ids)
        labels[i, :k] = torch.tensor(r.labels)
        last = r.position_ids[-1] if k else -1
        positions[i, :k] = torch.tensor(r.position_ids)
        positions[i, k:] = torch.arange(last + 1, last + 1 + n - k)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
