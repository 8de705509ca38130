"""A model's training / evaluation mode, switched for a block and restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) within the block, its mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
