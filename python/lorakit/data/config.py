"""What data to train on and how to prepare it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, get_args

from lorakit.data.formats import FORMATS, Format
from lorakit.validate import check_number

Dedup = Literal["none", "exact", "near"]
DEDUP = get_args(Dedup)


@dataclass
class DataConfig:
    """Data files, their format, and the preparation steps (dedup, filters, packing, split)."""

    data: list[str] = field(
        default_factory=list,
        metadata={
            "path": True,
            "help": "Training data: JSONL, JSON, CSV or Parquet files, or directories saved by "
            "datasets (local paths only).",
        },
    )
    mix: list[float] | None = field(
        default=None,
        metadata={
            "help": "Share of each data file in the mixture (e.g. 0.8 0.2), one per file; as "
            "many rows as the scarcest file allows are drawn, none repeated. Default: all rows."
        },
    )
    format: Format = field(
        default="auto",
        metadata={
            "help": "Row format: chat (messages), alpaca (instruction/input/output), "
            "prompt_completion, text (plain text, every token trained on), or auto "
            "(from the columns of the first row). Preference data: auto only."
        },
    )
    val_data: str | None = field(
        default=None,
        metadata={"path": True, "help": "Validation file; default: a share of the training rows."},
    )
    val_fraction: float = field(
        default=0.05,
        metadata={"help": "Share of training rows held out for validation when no val_data."},
    )
    seq_len: int = field(
        default=512,
        metadata={
            "help": "Tokens per row. Longer examples are truncated (plain text is split into "
            "pieces instead); with packing, rows hold several examples up to this length."
        },
    )
    pack: bool = field(
        default=True,
        metadata={
            "help": "Pack several examples into each row (attention and position ids stay "
            "within each example). Preference pairs are never packed."
        },
    )
    dedup: Dedup = field(
        default="near",
        metadata={
            "help": "Drop rows whose text repeats an earlier row of their file exactly (exact), "
            "or also rows that nearly repeat one (near: MinHash estimate of word 5-gram "
            "Jaccard similarity >= near_dup_threshold)."
        },
    )
    near_dup_threshold: float = field(
        default=0.8, metadata={"help": "Similarity from which a row counts as a near duplicate."}
    )
    min_tokens: int = field(
        default=0, metadata={"help": "Drop examples with fewer tokens than this (before cutting)."}
    )
    max_tokens: int = field(
        default=0,
        metadata={
            "help": "Drop examples with more tokens than this instead of cutting them; 0: keep."
        },
    )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown data format {self.format!r}; choose one of {FORMATS}")
        if self.dedup not in DEDUP:
            raise ValueError(f"dedup must be one of {DEDUP}, got {self.dedup!r}")
        if self.mix is not None:
            if len(self.mix) != len(self.data):
                raise ValueError(f"mix has {len(self.mix)} shares for {len(self.data)} files")
            for share in self.mix:
                check_number("mix shares", share, low=0, low_open=True)
        self._check_files_distinct()
        check_number("val_fraction", self.val_fraction, low=0, high=1, high_open=True)
        check_number("seq_len", self.seq_len, integer=True, low=2)
        check_number("near_dup_threshold", self.near_dup_threshold, low=0, high=1, low_open=True)
        check_number("min_tokens", self.min_tokens, integer=True, low=0)
        check_number("max_tokens", self.max_tokens, integer=True, low=0)
        if 0 < self.max_tokens < self.min_tokens:
            raise ValueError(
                f"max_tokens {self.max_tokens} is below min_tokens {self.min_tokens}: "
                "every row would be dropped"
            )

    def _check_files_distinct(self) -> None:
        # Deduplication works within each file, so a file named twice would train on each of
        # its rows twice, and a validation file that is also training data measures nothing new.
        seen: set[str] = set()
        for path in self.data:
            real = os.path.realpath(path)
            if real in seen:
                raise ValueError(f"data names {path} twice: each of its rows would count twice")
            seen.add(real)
        if self.val_data is not None and os.path.realpath(self.val_data) in seen:
            raise ValueError(
                f"val_data {self.val_data} is also a training file: validation would score rows "
                "the model trains on"
            )
