"""Training losses as pure functions over tensors: no model, no data, no loop.

Each function states its formula and its source.
"""

from lorakit.losses.causal_lm import causal_lm_loss_sum

__all__ = ["causal_lm_loss_sum"]
