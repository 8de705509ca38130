"""``lorakit sft``: supervised fine-tuning on chat, Alpaca or prompt / completion rows (loss on
the responses), and the causal-LM training every token-row recipe shares."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from lorakit.data import PreparedData, collate, prepare
from lorakit.models import load_model, load_tokenizer, pad_id
from lorakit.models.positions import check_positions
from lorakit.models.vocab import check_token_ids
from lorakit.peft import AdapterReport
from lorakit.recipes.common import (
    RunConfig,
    RunResult,
    batches,
    make_trainable,
    train_and_save,
)
from lorakit.train.objectives import CausalLMObjective


@dataclass
class SFTConfig(RunConfig):
    """Supervised fine-tuning: the model, the method, the data and the loop."""


def train_causal_lm(
    model: nn.Module, tokenizer: Any, config: RunConfig, data: PreparedData, report: AdapterReport
) -> RunResult:
    """Trains a ``model`` that :func:`make_trainable` prepared (``report``) on next-token
    prediction over ``data`` (prepared from ``config.data``); saves the result."""
    packed = (*data.train, *data.val)
    check_positions(model, (row.position_ids[-1] + 1 for row in packed if row.position_ids))
    pad = pad_id(tokenizer)
    check_token_ids(model, (row.input_ids for row in packed), {"pad": pad})
    rows = partial(collate, pad_id=pad)
    return train_and_save(
        model,
        tokenizer,
        config,
        CausalLMObjective(pad, fused_ce=config.train.fused_ce),
        batches(config, data.train, rows),
        batches(config, data.val, rows),
        report,
        data.report,
    )


def finetune(model: nn.Module, tokenizer: Any, config: RunConfig) -> RunResult:
    """Trains an already loaded ``model`` as ``config`` says and saves the result."""
    data = prepare(config.data, tokenizer, config.train.seed)
    return train_causal_lm(model, tokenizer, config, data, make_trainable(model, config))


def run(config: RunConfig) -> RunResult:
    """Loads ``config.model.model`` and fine-tunes it; the data is read first, so that a bad
    data file is reported before a large model is loaded."""
    tokenizer = load_tokenizer(config.model)
    data = prepare(config.data, tokenizer, config.train.seed)
    model = load_model(config.model)
    return train_causal_lm(model, tokenizer, config, data, make_trainable(model, config))
