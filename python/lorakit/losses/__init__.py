"""Training losses as pure functions over tensors: no model, no data, no loop.

Each function states its formula and its source. Those over preference pairs return per-pair
values, so that a caller can sum them over the micro-batches of an accumulated step and divide by
the step's pair count.
"""

from lorakit.losses.causal_lm import causal_lm_loss_sum, causal_lm_loss_sum_from_hidden
from lorakit.losses.dpo import DPOLossOutput, DPOLossType, dpo_loss
from lorakit.losses.logprobs import sequence_logprobs, sequence_logprobs_from_logits
from lorakit.losses.reward import RewardLossOutput, reward_loss

__all__ = [
    "DPOLossOutput",
    "DPOLossType",
    "RewardLossOutput",
    "causal_lm_loss_sum",
    "causal_lm_loss_sum_from_hidden",
    "dpo_loss",
    "reward_loss",
    "sequence_logprobs",
    "sequence_logprobs_from_logits",
]
