"""Loading a local data file (JSONL, JSON, CSV, Parquet, text) or a saved ``datasets`` directory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets

from lorakit.data.text_files import check_csv, check_json, check_jsonl, check_text
from lorakit.paths import check_link


def _no_check(path: Path) -> None:
    """Parquet: a binary format its reader checks itself."""


# Per suffix: the datasets builder that reads it, and the check that names a bad line first.
# .txt: one row per line, in a "text" column (blank lines are no rows).
_FORMATS: dict[str, tuple[str, Callable[[Path], None]]] = {
    ".jsonl": ("json", check_jsonl),
    ".json": ("json", check_json),
    ".csv": ("csv", check_csv),
    ".parquet": ("parquet", _no_check),
    ".txt": ("text", check_text),
}


def load_rows(path: str | Path) -> datasets.Dataset:
    """Reads a local file or a directory written by ``Dataset.save_to_disk``; never downloads.

    Raises:
        ValueError: the path does not exist, has an unknown suffix, is empty, is not UTF-8
            text, or a line is not JSON (see :mod:`lorakit.data.text_files`).
    """
    path = Path(path)
    check_link(path, "data path")
    if not path.exists():
        raise ValueError(f"data path {path} does not exist")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{path} is not a directory saved by datasets: {e}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path} holds splits {list(loaded)} but no 'train' split")
            loaded = loaded["train"]
        return loaded
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(
            f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FORMATS)} "
            "or a directory saved by datasets"
        )
    builder, check = _FORMATS[path.suffix.lower()]
    if path.stat().st_size == 0:  # datasets raises StopIteration or a parser's error
        raise ValueError(f"{path} is empty (0 bytes)")
    check(path)
    # The text builder would keep a UTF-8 byte-order mark in the first row's text.
    options = {"encoding": "utf-8-sig"} if builder == "text" else {}
    try:
        with _datasets_logs_quiet():
            rows = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as e:
        cause = e.__cause__ or e
        raise ValueError(f"{path}: cannot be read as {builder}: {cause}") from None
    if builder == "text":
        rows = rows.filter(lambda row: bool(row["text"].strip()))
        if len(rows) == 0:
            raise ValueError(f"{path} has no rows (only blank lines)")
    return rows


@contextmanager
def _datasets_logs_quiet() -> Iterator[None]:
    # A file datasets cannot parse is also logged as an error before the exception, which would
    # print the problem twice; the exception is reported instead (one line, naming the file).
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
