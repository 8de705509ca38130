"""Batched sampling with a KV cache through lorakit's layers (rollouts for PPO and GRPO)."""

from lorakit.generation.sampling import NonFiniteLogits, Rollout, SamplingOptions, sample

__all__ = ["NonFiniteLogits", "Rollout", "SamplingOptions", "sample"]
