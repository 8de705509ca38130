"""Loading a local data file (JSONL, JSON, CSV, Parquet, text) or a saved ``datasets`` directory."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets

# .txt: one row per line, in a "text" column.
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


def _check_jsonl(path: Path) -> None:
    # datasets reports a bad line as an Arrow parse error without its number, and a file of
    # blank lines as "no data" for split "train"; find both first.
    rows = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: line {number} is not UTF-8 text ({e.reason} at byte {e.start} of "
                    "the line)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number} is a {type(row).__name__}, not an object")
            rows += 1
    if rows == 0:
        raise ValueError(f"{path} has no rows")


def load_rows(path: str | Path) -> datasets.Dataset:
    """Reads a local file or a directory written by ``Dataset.save_to_disk``; never downloads.

    Raises:
        ValueError: the path does not exist, has an unknown suffix, is empty, or a line is not
            JSON.
    """
    path = Path(path)
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
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_BUILDERS)} "
            "or a directory saved by datasets"
        )
    if path.stat().st_size == 0:  # datasets raises StopIteration or a parser's error
        raise ValueError(f"{path} is empty (0 bytes)")
    if path.suffix.lower() == ".jsonl":
        _check_jsonl(path)
    try:
        with _datasets_logs_quiet():
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as e:
        cause = e.__cause__ or e
        raise ValueError(f"{path}: cannot be read as {builder}: {cause}") from None


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
