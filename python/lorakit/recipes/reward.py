"""``lorakit reward``: train a reward model on preference pairs, or score rows with one.

The model is the causal LM's backbone with a scalar head ``score`` (hidden -> 1) on the last
non-pad token, transformers' ``*ForSequenceClassification`` with one label, trained with LoRA,
QLoRA or fully on the Bradley-Terry loss (:func:`lorakit.losses.reward_loss`). The adapter is
saved in PEFT's format with ``task_type`` SEQ_CLS and the head in ``modules_to_save``, so
``peft.PeftModel.from_pretrained`` loads it on the same backbone and ``lorakit merge`` writes a
directory that ``AutoModelForSequenceClassification.from_pretrained`` loads with the same scores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data import (
    PreparedPairs,
    RowError,
    collate_pairs,
    encode_pair,
    load_rows,
    pair_segments,
    prepare_preferences,
)
from lorakit.file_writes import write_text_atomic
from lorakit.models import check_trained_head, load_sequence_classifier, load_tokenizer, pad_id
from lorakit.models.heads import check_reward_adapter
from lorakit.models.loading import SCORE_HEAD
from lorakit.models.vocab import check_token_ids
from lorakit.peft import AdapterReport, load_adapter
from lorakit.peft.inject import count_parameters
from lorakit.peft.whole_modules import train_whole
from lorakit.recipes.common import (
    RunConfig,
    RunResult,
    batches,
    check_pairs_fit,
    make_trainable,
    summary,
    train_and_save,
)
from lorakit.train import distributed
from lorakit.train.objectives.reward import RewardObjective
from lorakit.validate import check_number

# Methods whose reward model saves and loads whole: the head trains beside a LoRA adapter
# (PEFT's modules_to_save) or with every other weight.
METHODS = ("lora", "qlora", "full")


@dataclass
class RewardOptions:
    """The reward model's loss, and scoring with a trained one."""

    center_coefficient: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the centering term mean((r_c + r_r)^2) (Eisenstein et al. 2023), "
            "which keeps rewards near 0; 0: off."
        },
    )
    use_margin: bool = field(
        default=True,
        metadata={"help": "Subtract each pair's margin column (when the data has one)."},
    )
    score: bool = field(
        default=False,
        metadata={
            "help": "Score --data instead of training: prompt/completion rows (or preference "
            "rows: both sides, and the pairwise accuracy) with the reward model --model "
            "(a directory written by lorakit merge or --method full) or --model plus "
            "--adapter; writes out/scores.jsonl."
        },
    )
    adapter: str = field(
        default="",
        metadata={
            "path": True,
            "help": "With --score: a reward adapter written by lorakit reward.",
        },
    )

    def __post_init__(self) -> None:
        check_number("center_coefficient", self.center_coefficient, low=0)


@dataclass
class RewardConfig(RunConfig):
    """A reward model: the backbone, the method, the preference data, the loop and the loss."""

    reward: RewardOptions = field(default_factory=RewardOptions)


def _check(config: RewardConfig) -> None:
    if config.model.method not in METHODS:
        raise ValueError(
            f"a reward model trains with --method {', '.join(METHODS)}; "
            f"{config.model.method!r} cannot save its score head"
        )


def untrained(config: RewardConfig, tokenizer: Any) -> tuple[nn.Module, AdapterReport]:
    """The backbone of ``config.model`` with a new score head (seeded), made trainable: the
    reward model before training. ``tokenizer`` is ``config.model``'s (its pad token)."""
    _check(config)
    torch.manual_seed(config.train.seed)  # the new score head's initialisation
    model = load_sequence_classifier(config.model, pad_id(tokenizer))
    report = make_trainable(model, config)
    if config.model.method != "full":
        train_whole(model, [SCORE_HEAD])
        trainable, total = count_parameters(model)
        report = AdapterReport(report.replaced, trainable, total)
    return model, report


def train(
    model: nn.Module,
    tokenizer: Any,
    report: AdapterReport,
    config: RewardConfig,
    data: PreparedPairs,
) -> RunResult:
    """Trains a reward model from :func:`untrained` on ``data`` (prepared from ``config.data``)
    and saves it."""
    check_pairs_fit(model, (*data.train, *data.val), pad_id(tokenizer))
    pairs = partial(collate_pairs, pad_id=pad_id(tokenizer))
    objective = RewardObjective(config.reward.center_coefficient, config.reward.use_margin)
    return train_and_save(
        model,
        tokenizer,
        config,
        objective,
        batches(config, data.train, pairs),
        batches(config, data.val, pairs),
        report,
        data.report,
    )


def run(config: RewardConfig) -> RunResult:
    """Trains and saves a reward model as the module docstring says; the data is read first, so
    that a bad data file is reported before a large model is loaded."""
    _check(config)
    if config.reward.adapter:
        raise ValueError(
            f"--adapter {config.reward.adapter} goes with --score; a reward model trains from "
            "--model alone"
        )
    if not config.data.data:
        raise ValueError("missing --data")
    tokenizer = load_tokenizer(config.model)
    data = prepare_preferences(config.data, tokenizer, config.train.seed)
    model, report = untrained(config, tokenizer)
    return train(model, tokenizer, report, config, data)


def pair_scores(
    model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]]
) -> tuple[list[float], list[float]]:
    """The rewards of the chosen and of the rejected side of ``{"prompt", "chosen",
    "rejected"}`` rows."""
    prompts = [r["prompt"] for r in rows]
    chosen = score(model, tokenizer, prompts, [r["chosen"] for r in rows])
    return chosen, score(model, tokenizer, prompts, [r["rejected"] for r in rows])


def pairwise_accuracy(model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]]) -> float:
    """Share of ``{"prompt", "chosen", "rejected"}`` rows whose chosen side scores higher."""
    chosen, rejected = pair_scores(model, tokenizer, rows)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(1, len(rows))


def check_reward_model(config: RewardConfig) -> None:
    """Refuses, from its files alone (before anything loads), a reward model whose scores
    would come from a random head: ``--adapter`` without a trained score head, or ``--model``
    without one when no adapter is given.

    Raises:
        FileNotFoundError: the adapter folder has no ``adapter_config.json``.
        ValueError: the head is missing (see :func:`lorakit.models.check_trained_head`).
    """
    if config.reward.adapter:
        check_reward_adapter(config.reward.adapter)
    else:
        check_trained_head(config.model)


def load_reward_model(config: RewardConfig, tokenizer: Any) -> nn.Module:
    """A trained reward model (checked by :func:`check_reward_model`): ``--model`` as a
    sequence classifier, with ``--adapter`` (and its score head) loaded on it when given;
    ``tokenizer`` is ``--model``'s."""
    check_reward_model(config)
    model = load_sequence_classifier(config.model, pad_id(tokenizer))
    if config.reward.adapter:
        load_adapter(model, config.reward.adapter)
    return model.eval()


@torch.no_grad()
def score(
    model: nn.Module, tokenizer: Any, prompts: list[str], completions: list[str], batch: int = 8
) -> list[float]:
    """The reward of each (prompt, completion), rendered as in training (the chat template for
    chat models, else prompt and completion joined) and scored at the last real token."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(prompts), batch):
        # Rendered and tokenized as a pair's chosen side is, so that training and scoring see
        # the same tokens.
        pairs = [
            encode_pair(
                pair_segments({"prompt": p, "chosen": c, "rejected": c}, tokenizer), tokenizer
            )
            for p, c in zip(prompts[i : i + batch], completions[i : i + batch], strict=True)
        ]
        check_token_ids(model, (p.chosen.input_ids for p in pairs), {"pad": pad})
        rows = collate_pairs(pairs, pad)
        n = len(pairs)
        out = model(
            input_ids=rows["input_ids"][:n].to(device),
            attention_mask=rows["attention_mask"][:n].to(device),
            use_cache=False,
        )
        scores += out.logits[:, 0].float().tolist()
    return scores


def _score_columns(path: str, rows: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[str]:
    """The columns ``--score`` reads from ``rows`` (a pair's, else a completion's), each row
    checked as scoring renders it, so that a bad row is reported before the model loads.

    Raises:
        ValueError: the file has neither layout, or a row lacks a column or holds a value that
            is not a string or message list (naming the file and row).
    """
    keys = set(rows[0]) if rows else set()
    if {"prompt", "chosen", "rejected"} <= keys:
        columns = ["prompt", "chosen", "rejected"]
    elif {"prompt", "completion"} <= keys:
        columns = ["prompt", "completion"]
    else:
        raise ValueError(
            f"{path}: --score needs prompt and completion columns, or prompt, chosen and "
            f"rejected; found {sorted(keys)}"
        )
    for index, row in enumerate(rows):
        for column in columns:
            value = row.get(column)
            if value is None:
                raise RowError(path, index, f"missing {column!r}")
            if not isinstance(value, str | list):
                kind = type(value).__name__
                raise RowError(path, index, f"{column!r} must be text or messages, got {kind}")
        sides = {"chosen": row[columns[1]], "rejected": row[columns[-1]]}
        try:
            pair_segments({"prompt": row["prompt"], **sides}, tokenizer)
        except ValueError as e:
            raise RowError(path, index, str(e)) from None
    return columns


def score_file(config: RewardConfig) -> str:
    """``lorakit reward --score``: writes ``out/scores.jsonl``; returns a summary line."""
    if len(config.data.data) != 1:
        raise ValueError("--score takes one --data file")
    path = config.data.data[0]
    rows = load_rows(path)
    tokenizer = load_tokenizer(config.model)
    columns = _score_columns(path, rows, tokenizer)
    model = load_reward_model(config, tokenizer)
    out = Path(config.train.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "scores.jsonl"
    if "chosen" in columns:
        chosen, rejected = pair_scores(model, tokenizer, rows)
        records = [
            {"chosen_score": c, "rejected_score": r} for c, r in zip(chosen, rejected, strict=True)
        ]
        accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(1, len(rows))
        line = f"scored {len(rows)} pairs: pairwise accuracy {accuracy:.1%}; {target}"
    else:
        values = score(
            model, tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows]
        )
        records = [{"score": v} for v in values]
        line = f"scored {len(rows)} rows: mean {sum(values) / max(1, len(values)):.4f}; {target}"
    write_text_atomic(target, "".join(json.dumps(r) + "\n" for r in records))
    return line


def main(config: RewardConfig) -> str:
    """``lorakit reward``: trains (the default) or scores (``--score``)."""
    if config.reward.score:
        return score_file(config) if distributed.is_main() else ""
    result = run(config)
    return summary(result) if distributed.is_main() else ""
