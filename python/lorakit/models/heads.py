"""Scalar heads on a causal LM's backbone that share its weights: PPO's value model (its own
adapter plus a value head, one value per token) and a reward model trained by ``lorakit reward``
loaded as one more named adapter plus its score head. Switching between them and the policy
switches the active adapter, and moves no weight; the value model may start as a copy of the
reward model's adapter and head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lorakit.models.loading import SCORE_HEAD
from lorakit.peft import (
    LoraConfig,
    active_adapter,
    apply_lora,
    load_adapter,
    set_adapter,
    using_adapter,
)
from lorakit.peft.files import CONFIG_NAME, read_adapter_config


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a causal LM's head (transformers' ``base_model``: ``model.model``
    for Llama, ``model.transformer`` for GPT-2), whose output is the last hidden state.

    Raises:
        ValueError: the model has no separate backbone.
    """
    inner = getattr(model, "base_model", model)
    if inner is model:
        raise ValueError(f"{type(model).__name__} has no backbone (base_model) to put a head on")
    return inner


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


class ValueHead(nn.Linear):
    """hidden -> 1, float32, zero-initialised: the value model starts at V = 0 (its adapter's
    B = 0 too), so the first advantages are the rewards-to-go themselves."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden, 1, bias=True, dtype=torch.float32)
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()


@contextlib.contextmanager
def _training_state_kept(model: nn.Module) -> Iterator[None]:
    """Adding an adapter freezes what is not an adapter and may change the active one: what
    trained before trains again afterwards, and the active adapter is restored."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    previous = active_adapter(model)
    yield
    for parameter in trainable:
        parameter.requires_grad_(True)
    if previous is not None:
        set_adapter(model, previous)


def add_value_adapter(model: nn.Module, config: LoraConfig, name: str = "value") -> ValueHead:
    """Adds LoRA adapter ``name`` (``config``'s targets, on the backbone's layers as they are:
    NF4 stays NF4) and returns a new :class:`ValueHead` on the model's device. What trained
    before still trains, the value adapter trains too, and the active adapter is unchanged."""
    with _training_state_kept(model):
        apply_lora(backbone(model), replace(config, quantize=None), name)
    device = next(model.parameters()).device
    return ValueHead(hidden_size(model)).to(device)


def value_from_reward_adapter(
    model: nn.Module, folder: str | Path, name: str = "value"
) -> ValueHead:
    """Adds value adapter ``name`` as a trainable copy of a reward adapter written by ``lorakit
    reward``, and returns a :class:`ValueHead` holding a copy of its score head: the value model
    starts as the reward model (TRL's PPO starts its value model from the reward model's
    weights), so the first values are the reward model's scores of each prefix. What trained
    before still trains, and the active adapter is unchanged.

    Raises:
        ValueError: the files do not fit the model (see :func:`lorakit.load_adapter`).
    """
    with _training_state_kept(model):
        score = _load_scored_adapter(model, folder, name, trainable=True)
    head = ValueHead(hidden_size(model)).to(score.weight.device)
    with torch.no_grad():
        head.weight.copy_(score.weight)
    return head


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count from each row's first real token (left padding), as generate uses them.
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def token_values(
    model: nn.Module,
    head: nn.Module,
    adapter: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
) -> torch.Tensor:
    """The value of the state before each completion token, float32 (rows, completion_len):
    ``head`` on the backbone's last hidden state at the position that predicts the token, with
    adapter ``adapter`` active (TRL's PPO reads its value model at the same positions)."""
    n = completion_len
    with using_adapter(model, adapter):
        hidden = backbone(model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_positions(attention_mask),
            use_cache=False,
        ).last_hidden_state
    return head(hidden[:, -(n + 1) : -1].float()).squeeze(-1)


class AdapterRewardModel(nn.Module):
    """A reward model that is adapter ``name`` of a causal LM plus a score head: called like
    transformers' ``*ForSequenceClassification`` with one label (the score at the last token
    that is not ``pad_token_id``), so :func:`lorakit.recipes.reward.score` scores with it.

    The LM is held, not owned (it is not a submodule): its weights are the policy's.
    """

    def __init__(self, model: nn.Module, name: str, score: nn.Linear, pad_token_id: int) -> None:
        super().__init__()
        self.shared: tuple[nn.Module] = (model,)
        self.name, self.score, self.pad_token_id = name, score, pad_token_id

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> SimpleNamespace:
        model = self.shared[0]
        with using_adapter(model, self.name):
            hidden = backbone(model)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        # transformers' rule for the scored position: the last token that is not padding.
        real = (input_ids != self.pad_token_id).int()
        last = (torch.arange(input_ids.shape[1], device=input_ids.device) * real).argmax(-1)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return SimpleNamespace(logits=self.score(hidden[rows, last]))


def check_reward_adapter(folder: str | Path) -> None:
    """Refuses an adapter without a trained score head (one written by ``lorakit sft``, say):
    scores from it would come from a randomly initialised head.

    Raises:
        FileNotFoundError: ``folder`` has no ``adapter_config.json``.
        ValueError: its ``modules_to_save`` does not list the score head.
    """
    path = Path(folder) / CONFIG_NAME
    if SCORE_HEAD not in (read_adapter_config(Path(folder)).get("modules_to_save") or []):
        raise ValueError(
            f"{folder} is no reward adapter: {path} lists no trained {SCORE_HEAD!r} head in "
            "modules_to_save (lorakit reward writes one)"
        )


def load_reward_adapter(
    model: nn.Module, folder: str | Path, pad_token_id: int, name: str = "reward"
) -> AdapterRewardModel:
    """Loads a reward adapter written by ``lorakit reward`` (LoRA + the ``score`` head in
    ``modules_to_save``) onto ``model``'s backbone as adapter ``name``, frozen; the policy's
    adapter stays active.

    The adapter's keys name layers of the ``*ForSequenceClassification`` model it was trained
    on, whose backbone sits under the same attribute as the causal LM's: loading it into a
    module laid out like that (the shared backbone plus a new ``score``) puts its LoRA weights
    on the shared layers and its head in ``score``.

    Raises:
        ValueError: the adapter has no score head, or the files do not fit the model (see
            :func:`lorakit.load_adapter`).
    """
    check_reward_adapter(folder)
    return AdapterRewardModel(
        model, name, _load_scored_adapter(model, folder, name, trainable=False), pad_token_id
    )


def _load_scored_adapter(
    model: nn.Module, folder: str | Path, name: str, trainable: bool
) -> nn.Linear:
    """Loads a reward adapter's LoRA weights onto ``model``'s backbone as adapter ``name`` and
    returns its score head (see :func:`load_reward_adapter`)."""
    shell = nn.Module()
    setattr(shell, model.base_model_prefix, backbone(model))
    device = next(model.parameters()).device
    dtype = backbone(model).get_input_embeddings().weight.dtype
    head = nn.Linear(hidden_size(model), 1, bias=False, device=device, dtype=dtype)
    setattr(shell, SCORE_HEAD, head)
    load_adapter(shell, folder, name, trainable=trainable)
    return head
