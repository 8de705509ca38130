"""Preference files -> training and validation pairs, as :mod:`lorakit.data.pipeline` does for
SFT: render, drop pairs whose completions are identical, deduplicate, tokenize, filter by length,
truncate, mix, split.

The :class:`~lorakit.data.DataConfig` fields mean what they mean for SFT, with these exceptions:
``format`` must stay ``auto`` (each row's layout is read from its values, see
:mod:`lorakit.data.preference`); ``pack`` does not apply (a pair is never packed with another);
deduplication compares whole pairs (prompt, chosen and rejected together), so pairs that share
a prompt but differ in their completions are kept unless they are near duplicates as a whole;
``min_tokens`` drops a pair whose shorter sequence (prompt + completion) is shorter than that,
and ``max_tokens`` one whose longer sequence is longer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.data.config import DataConfig
from lorakit.data.formats import RowError
from lorakit.data.pairs import Pair, encode_pair, truncate_pair
from lorakit.data.pipeline import DataReport, assemble, duplicates, read
from lorakit.data.preference import pair_segments


@dataclass(frozen=True)
class PreparedPairs:
    train: list[Pair]
    val: list[Pair]
    report: DataReport


def load_pairs(path: str, config: DataConfig, tokenizer: Any, report: DataReport) -> list[Pair]:
    """One file's pairs after rendering, filtering, deduplication, tokenization and truncation.

    Raises:
        ValueError: the file cannot be read or a row is malformed (the message names the row).
    """
    rows = read(path, report)
    rendered = []
    for index, row in enumerate(rows):
        try:
            rendered.append(pair_segments(row, tokenizer))
        except ValueError as e:
            raise RowError(path, index, str(e)) from None
    same = {i for i, s in enumerate(rendered) if s.identical}
    report.add(path, "chosen identical to rejected, dropped", len(same))
    distinct = [i for i in range(len(rendered)) if i not in same]
    drop = duplicates([rendered[i].text for i in distinct], config, path, report)

    pairs: list[Pair] = []
    for k in (k for k in range(len(distinct)) if k not in drop):
        index = distinct[k]
        try:
            pair = encode_pair(rendered[index], tokenizer)
        except ValueError as e:
            raise RowError(path, index, str(e)) from None
        shorter = min(len(pair.chosen), len(pair.rejected))
        if shorter < config.min_tokens:
            report.add(path, f"shorter than {config.min_tokens} tokens dropped")
            continue
        if config.max_tokens and len(pair) > config.max_tokens:
            report.add(path, f"longer than {config.max_tokens} tokens dropped")
            continue
        if len(pair) > config.seq_len:
            cut = truncate_pair(pair, config.seq_len, tokenizer.bos_token_id)
            report.add(path, "truncated")
            report.add(path, "tokens cut", len(pair) - len(cut))
            if cut.chosen.input_ids == cut.rejected.input_ids:
                report.add(path, "identical after truncation, dropped")
                continue
            pair = cut
        pairs.append(pair)
    report.add(path, "kept", len(pairs))
    return pairs


def prepare_preferences(config: DataConfig, tokenizer: Any, seed: int = 0) -> PreparedPairs:
    """Everything in this module's docstring, with a report of what each step did, per file.

    Raises:
        ValueError: no data, a format other than ``auto``, a file cannot be read, or a row is
            malformed (the message names the file and row).
    """
    if config.format != "auto":
        raise ValueError(
            f"format {config.format!r} does not apply to preference data: leave it 'auto' "
            "(each row's layout is read from its values)"
        )
    report = DataReport()
    train, val = assemble(
        config, lambda path: load_pairs(path, config, tokenizer, report), seed, report
    )
    return PreparedPairs(train, val, report)
