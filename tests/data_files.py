"""Rows written as the data files lorakit reads, for the data and recipe tests."""

import codecs
import json
from pathlib import Path

import datasets

SUFFIXES = ["jsonl", "json", "csv", "parquet", "saved"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_as(path: Path, rows: list[dict], suffix: str) -> Path:
    """``rows`` at ``path`` as ``suffix`` says: JSONL, JSON, CSV, Parquet, or a ``datasets``
    directory (``saved``)."""
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif suffix == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def as_written_on_windows(data: bytes, suffix: str) -> bytes:
    """``data`` (a UTF-8 file of ``suffix``) as an editor may save it: a UTF-8 byte-order mark,
    CRLF line ends and a blank line after each line (in JSONL also trailing whitespace; a JSON
    file pretty-printed), which lorakit reads as the plain file."""
    if suffix == "json":
        data = json.dumps(json.loads(data), indent=2).encode()
    end = b" \t\r\n" if suffix == "jsonl" else b"\r\n"
    return codecs.BOM_UTF8 + data.replace(b"\n", end + b"\r\n")
