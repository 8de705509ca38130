"""The objectives recipes hand to the :class:`~lorakit.train.Trainer`."""

from lorakit.train.objectives.causal_lm import CausalLMObjective

__all__ = ["CausalLMObjective"]
