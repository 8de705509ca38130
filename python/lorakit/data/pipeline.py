"""Files -> training and validation rows: render, deduplicate, tokenize, filter, mix, split, pack.

Deduplication comes before the split so that no row is in both training and validation.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import datasets

from lorakit.data.config import DataConfig
from lorakit.data.dedup import exact_duplicates, near_duplicates
from lorakit.data.encode import Example, encode, truncate
from lorakit.data.formats import RowError, detect, to_segments
from lorakit.data.load import load_rows
from lorakit.data.packing import Row, pack

T = TypeVar("T")


@dataclass
class DataReport:
    """How many rows each step read, dropped or changed, per file (``counts[file][step]``)."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, source: str, step: str, n: int = 1) -> None:
        self.counts.setdefault(source, Counter())[step] += n

    def __str__(self) -> str:
        return "\n".join(
            f"{source}: " + ", ".join(f"{step} {n}" for step, n in counts.items())
            for source, counts in self.counts.items()
        )


@dataclass(frozen=True)
class PreparedData:
    train: list[Row]
    val: list[Row]
    report: DataReport


def _split_long(example: Example, length: int) -> list[Example]:
    # Plain text is cut into consecutive pieces rather than truncated: all of it is training data.
    return [
        Example(example.input_ids[i : i + length], example.labels[i : i + length])
        for i in range(0, len(example), length)
    ]


def read(path: str, report: DataReport) -> datasets.Dataset:
    """One file's rows, counted in the report.

    Raises:
        ValueError: the file cannot be read or has no rows.
    """
    rows = load_rows(path)
    report.add(path, "read", len(rows))
    if len(rows) == 0:
        raise ValueError(f"{path} has no rows")
    return rows


def duplicates(texts: list[str], config: DataConfig, path: str, report: DataReport) -> set[int]:
    """Indices of the rows that ``config.dedup`` drops, counted in the report."""
    drop: set[int] = set()
    if config.dedup != "none":
        drop.update(exact_duplicates(texts))
        report.add(path, "exact duplicates dropped", len(drop))
    if config.dedup == "near":
        kept = [i for i in range(len(texts)) if i not in drop]
        similar = near_duplicates([texts[i] for i in kept], config.near_dup_threshold)
        near = [kept[i] for i in similar]
        drop.update(near)
        report.add(path, "near duplicates dropped", len(near))
    return drop


def load_examples(
    path: str, config: DataConfig, tokenizer: Any, report: DataReport
) -> list[Example]:
    """One file's examples after rendering, deduplication, tokenization and length filters.

    Raises:
        ValueError: the file cannot be read or a row is malformed (the message names the row).
    """
    rows = read(path, report)
    try:
        fmt = detect(rows[0]) if config.format == "auto" else config.format
    except ValueError as e:
        raise RowError(path, 0, str(e)) from None
    rendered = []
    for index, row in enumerate(rows):
        try:
            rendered.append(to_segments(row, fmt, tokenizer))
        except ValueError as e:
            raise RowError(path, index, str(e)) from None

    drop = duplicates(["".join(text for text, _ in s) for s in rendered], config, path, report)
    examples: list[Example] = []
    for index, segments in enumerate(rendered):
        if index in drop:
            continue
        example = encode(segments, tokenizer)
        if len(example) < config.min_tokens:
            report.add(path, f"shorter than {config.min_tokens} tokens dropped")
        elif config.max_tokens and len(example) > config.max_tokens:
            report.add(path, f"longer than {config.max_tokens} tokens dropped")
        elif fmt == "text":
            examples += _split_long(example, config.seq_len)
        elif len(example) > config.seq_len:
            cut = truncate(example, config.seq_len)
            report.add(path, "truncated")
            report.add(path, "tokens cut", len(example) - len(cut))
            if cut.trained_tokens:
                examples.append(cut)
            else:
                report.add(path, "nothing to train on after truncation, dropped")
        else:
            examples.append(example)
    report.add(path, "kept", len(examples))
    return examples


def mix(groups: list[list[T]], shares: list[float], rng: random.Random) -> list[T]:
    """Draws from each group in proportion to its share, as many as the scarcest group allows
    without repeating an item, and shuffles them together."""
    total = min(len(g) / (s / sum(shares)) for g, s in zip(groups, shares, strict=True))
    mixed = []
    for group, share in zip(groups, shares, strict=True):
        mixed += rng.sample(group, round(total * share / sum(shares)))
    rng.shuffle(mixed)
    return mixed


def assemble(
    config: DataConfig, load: Callable[[str], list[T]], seed: int, report: DataReport
) -> tuple[list[T], list[T]]:
    """Training and validation items: each file's items (``load(path)``, which counts what it
    drops in ``report``) mixed by ``config.mix`` or all shuffled together, then ``val_data`` or
    a held-out share.

    Raises:
        ValueError: no data, or nothing left to train on (with the report's counts).
    """
    if not config.data:
        raise ValueError("no training data given")
    rng = random.Random(seed)
    groups = [load(path) for path in config.data]
    if config.mix is not None:
        train = mix(groups, config.mix, rng)
    else:
        train = [item for group in groups for item in group]
        rng.shuffle(train)
    if config.val_data is not None:
        val = load(config.val_data)
    else:
        k = round(len(train) * config.val_fraction)
        train, val = train[k:], train[:k]
    if not train:
        counts = "; ".join(str(report).splitlines())
        raise ValueError(f"no training examples are left after filtering and the split ({counts})")
    return train, val


def prepare(config: DataConfig, tokenizer: Any, seed: int = 0) -> PreparedData:
    """Everything in this module's docstring, with a report of what each step did.

    Raises:
        ValueError: no data, a file cannot be read, or a row is malformed.
    """
    report = DataReport()
    train, val = assemble(
        config, lambda path: load_examples(path, config, tokenizer, report), seed, report
    )

    def rows(examples: list[Example]) -> list[Row]:
        return pack(examples, config.seq_len) if config.pack else [Row.of(e) for e in examples]

    return PreparedData(rows(train), rows(val), report)
