"""Training losses as pure functions over tensors: no model, no data, no loop.

Each function states its formula and its source. Those over preference pairs return per-pair
values, so that a caller can sum them over the micro-batches of an accumulated step and divide by
the step's pair count.
"""

from lorakit.losses.causal_lm import causal_lm_loss_sum, causal_lm_loss_sum_from_hidden
from lorakit.losses.dpo import DPOLossOutput, DPOLossType, dpo_loss
from lorakit.losses.entropy import entropy_from_logits
from lorakit.losses.grpo import AdvantageScale, Baseline, GroupAdvantages, group_advantages
from lorakit.losses.kl_control import AdaptiveKLController, FixedKLController
from lorakit.losses.logprobs import (
    sequence_logprobs,
    sequence_logprobs_from_logits,
    token_logprobs_from_logits,
)
from lorakit.losses.ppo import (
    KLEstimator,
    PolicyLossOutput,
    ValueLossOutput,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from lorakit.losses.reward import RewardLossOutput, reward_loss

__all__ = [
    "AdaptiveKLController",
    "AdvantageScale",
    "Baseline",
    "DPOLossOutput",
    "DPOLossType",
    "FixedKLController",
    "GroupAdvantages",
    "KLEstimator",
    "PolicyLossOutput",
    "RewardLossOutput",
    "ValueLossOutput",
    "causal_lm_loss_sum",
    "causal_lm_loss_sum_from_hidden",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_loss",
    "sequence_logprobs",
    "sequence_logprobs_from_logits",
    "token_logprobs_from_logits",
    "whiten",
]
