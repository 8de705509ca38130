"""``lorakit dpo``: direct preference optimisation of a causal LM on preference pairs.

The policy is the adapted model; the reference is the same model with its adapters disabled, so
the base exists once in memory. For full fine-tuning the reference is a frozen copy, unless
``--precompute-ref`` computes the reference's log-probs of every pair once before training
(also available with adapters); they are stored in ``out/reference_logps.safetensors`` with a
fingerprint of the pairs, and reused on resume. Start from a merged SFT model (``lorakit merge``)
so that the reference is the SFT model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data import Pair, PreparedPairs, collate_pairs, prepare_preferences
from lorakit.losses import DPOLossType
from lorakit.losses.dpo import check_options
from lorakit.models import load_model, load_tokenizer, pad_id
from lorakit.peft import AdapterReport
from lorakit.peft.files import read_tensors, write_tensors
from lorakit.recipes.common import (
    RunConfig,
    RunResult,
    batches,
    check_pairs_fit,
    make_trainable,
    train_and_save,
)
from lorakit.train import RowBatches, distributed, out_dir
from lorakit.train.batches import Batch
from lorakit.train.objectives.dpo import ADAPTERS_OFF, PRECOMPUTED, DPOObjective
from lorakit.train.resume_check import data_digest

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class DPOOptions:
    """The DPO loss and where its reference log-probs come from."""

    beta: float = field(
        default=0.1,
        metadata={"help": "Strength of the pull towards the reference (DPO's beta)."},
    )
    loss_type: DPOLossType = field(
        default="sigmoid",
        metadata={
            "help": "sigmoid (DPO), ipo (length-normalised, squared), hinge (SLiC), robust "
            "(for noisy labels, with label_smoothing); each as TRL 1.16 computes it."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Assumed rate of flipped labels, in [0, 0.5); loss_type robust only."},
    )
    precompute_ref: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference's log-probs of every pair once before training "
            "(no reference forward pass per step; with --method full, no frozen copy)."
        },
    )

    def __post_init__(self) -> None:
        check_options(self.beta, self.loss_type, self.label_smoothing)


@dataclass
class DPOConfig(RunConfig):
    """DPO: the model, the method, the preference data, the loop and the loss."""

    dpo: DPOOptions = field(default_factory=DPOOptions)


@torch.no_grad()
def _reference_table(
    objective: DPOObjective, model: nn.Module, pairs: list[Pair], pad: int, size: int
) -> torch.Tensor:
    """(pairs, 2) the reference's log-probs of each pair's chosen and rejected completion."""
    device = next(model.parameters()).device
    rows = RowBatches(pairs, size, partial(collate_pairs, pad_id=pad))
    parts = []
    for i in range(len(rows)):
        batch = {k: v.to(device) for k, v in rows.in_order(i).items()}
        logps = objective.reference_logps(model, batch).cpu()
        parts.append(logps.view(2, -1).t())
    return torch.cat(parts) if parts else torch.zeros(0, 2)


def precomputed_reference(
    config: DPOConfig, model: nn.Module, train: list[Pair], val: list[Pair], pad: int
) -> dict[str, torch.Tensor]:
    """The reference log-probs of the train and validation pairs, computed by ``model`` with its
    adapters disabled (or, fully fine-tuned, as it is before training), or read back from
    ``out/reference_logps.safetensors`` when that file was written for the same pairs."""
    path = Path(config.train.out) / REFERENCE_FILE
    fingerprint = {"train": data_digest(train), "val": data_digest(val)}
    if config.train.resume and path.is_file():
        stored = read_tensors(path, weights=False)  # the fingerprints are bytes
        meta = {k: bytes(stored.pop(f"{k}_fingerprint").tolist()).decode() for k in fingerprint}
        if meta == fingerprint:
            return stored
    reference = DPOObjective(ADAPTERS_OFF if config.model.method != "full" else model)
    size = config.train.batch_size
    table = {
        "train": _reference_table(reference, model, train, pad, size),
        "val": _reference_table(reference, model, val, pad, size),
    }
    if distributed.is_main():
        encoded = {
            f"{k}_fingerprint": torch.tensor(list(v.encode()), dtype=torch.uint8)
            for k, v in fingerprint.items()
        }
        write_tensors(path, {**table, **encoded})
    return table


def _indexed(pairs: list[Pair], table: torch.Tensor, pad: int) -> Callable[[list[int]], Batch]:
    """A collate of pair indices: the pairs' batch plus their reference log-probs from
    ``table`` as ``ref_logps`` (2B,), chosen first as the rows are."""

    def collate(indices: list[int]) -> Batch:
        batch = collate_pairs([pairs[i] for i in indices], pad)
        batch["ref_logps"] = torch.cat([table[indices, 0], table[indices, 1]])
        return batch

    return collate


def train(
    model: nn.Module,
    tokenizer: Any,
    report: AdapterReport,
    config: DPOConfig,
    data: PreparedPairs,
) -> RunResult:
    """Trains a ``model`` that :func:`make_trainable` prepared (``report``) with DPO on
    ``data`` (prepared from ``config.data``) and saves it."""
    check_pairs_fit(model, (*data.train, *data.val), pad_id(tokenizer))
    pad = pad_id(tokenizer)
    options = config.dpo
    loss: dict[str, Any] = {
        "beta": options.beta,
        "loss_type": options.loss_type,
        "label_smoothing": options.label_smoothing,
        "fused_ce": config.train.fused_ce,
    }
    # The reference file is written under out's lock, as the checkpoints are.
    with out_dir.claim(Path(config.train.out)):
        if options.precompute_ref:
            table = precomputed_reference(config, model, data.train, data.val, pad)
            objective = DPOObjective(PRECOMPUTED, **loss)
            train_rows = range(len(data.train))
            train = batches(config, train_rows, _indexed(data.train, table["train"], pad))
            val = batches(config, range(len(data.val)), _indexed(data.val, table["val"], pad))
        else:
            if config.model.method == "full":
                reference: str | nn.Module = copy.deepcopy(model).requires_grad_(False).eval()
            else:
                reference = ADAPTERS_OFF
            objective = DPOObjective(reference, **loss)
            pairs = partial(collate_pairs, pad_id=pad)
            train, val = batches(config, data.train, pairs), batches(config, data.val, pairs)
        # With the reference precomputed the batches hold indices: the pairs are the data.
        digest = data_digest(data.train, data.val)
        return train_and_save(
            model, tokenizer, config, objective, train, val, report, data.report, digest
        )


def run(config: DPOConfig) -> RunResult:
    """Loads ``config.model.model`` and trains it with DPO as the module docstring says; the
    data is read first, so that a bad data file is reported before a large model is loaded."""
    tokenizer = load_tokenizer(config.model)
    data = prepare_preferences(config.data, tokenizer, config.train.seed)
    model = load_model(config.model)
    return train(model, tokenizer, make_trainable(model, config), config, data)
