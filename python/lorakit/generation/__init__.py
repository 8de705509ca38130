"""Batched sampling with a KV cache through lorakit's layers (rollouts for PPO and GRPO)."""

from lorakit.generation.sampling import Rollout, SamplingOptions, sample

__all__ = ["Rollout", "SamplingOptions", "sample"]
