"""Losses as pure functions over tensors (no model, no data inside)."""

from lorakit.losses.causal_lm import causal_lm_loss_sum

__all__ = ["causal_lm_loss_sum"]
