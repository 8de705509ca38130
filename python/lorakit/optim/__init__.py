"""Optimizers whose step is one fused native op per parameter: AdamW with 32-bit or 8-bit state."""

from lorakit.optim.adamw import AdamW

__all__ = ["AdamW"]
