"""Micro-batches of training or validation rows, in an order that is a function of the step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

Batch = dict[str, torch.Tensor]
RowT = TypeVar("RowT")


class RowBatches(Generic[RowT]):
    """Micro-batches of ``rows``, collated by ``collate``.

    Training batch ``m`` is batch ``m % per_epoch`` of epoch ``m // per_epoch``, whose row order
    is a permutation seeded by ``seed + epoch``: the data position is a function of ``m`` alone,
    which is what exact resume needs. Evaluation batches keep the rows' order.
    """

    def __init__(
        self,
        rows: Sequence[RowT],
        batch_size: int,
        collate: Callable[[list[RowT]], Batch],
        seed: int = 0,
    ) -> None:
        self.rows, self.batch_size, self.collate, self.seed = rows, batch_size, collate, seed

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.rows) / self.batch_size)

    def shuffled(self, m: int) -> Batch:
        epoch, index = divmod(m, len(self))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.rows), generator=generator)
        size = self.batch_size
        return self.collate(
            [self.rows[i] for i in order[index * size : (index + 1) * size].tolist()]
        )

    def in_order(self, i: int) -> Batch:
        size = self.batch_size
        return self.collate(list(self.rows[i * size : (i + 1) * size]))
