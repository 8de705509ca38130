"""Checks of a text data file (JSONL, JSON, CSV, plain text) before a parser reads it.

The parsers underneath (pyarrow, pandas) report a bad byte or a JSON syntax error at an offset of
a block, or misname it (a UTF-16 file is "invalid JSON"), and take a repeated JSON key silently
(the last value wins). Here every line is decoded as UTF-8 and JSON is parsed, so that the
error names the file and the line. A UTF-8 byte-order mark, Windows line ends and blank lines
are accepted: the parsers read such files as they read the plain ones.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# UTF-32 LE's mark begins with UTF-16 LE's, so it is looked for first.
_OTHER_ENCODINGS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of each line of ``path`` (from 1, line ends kept), decoded as UTF-8,
    without the byte-order mark a UTF-8 file may start with.

    Raises:
        ValueError: the file is UTF-16 or UTF-32 (by its byte-order mark), or a line is not
            UTF-8 or holds a NUL byte (UTF-16 without a mark, or binary data).
    """
    with path.open("rb") as f:
        head = f.read(4)
        for mark, name in _OTHER_ENCODINGS:
            if head.startswith(mark):
                raise ValueError(
                    f"{path} is {name} text (it starts with a {name} byte-order mark); lorakit "
                    f"reads UTF-8: convert it, e.g. iconv -f {name} -t UTF-8"
                )
        f.seek(len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0)
        for number, raw in enumerate(f, 1):
            if b"\0" in raw:
                raise ValueError(
                    f"{path}: line {number} holds a NUL byte: it is not UTF-8 text (UTF-16 "
                    "without a byte-order mark, or a binary file?)"
                )
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: line {number} is not UTF-8 text ({e.reason} at byte {e.start} of "
                    "the line)"
                ) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} is repeated in one object")
        seen[key] = value
    return seen


def _parse(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:  # Python's parser recurses per level of nesting
        raise ValueError("a value is nested too deeply to read") from None


def _kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def check_jsonl(path: Path) -> None:
    """One JSON object per line (blank lines skipped).

    Raises:
        ValueError: as :func:`utf8_lines`, a line that is not a JSON object (named), or no rows.
    """
    rows = 0
    for number, line in utf8_lines(path):
        if not line.strip():
            continue
        if rows == 0 and line.lstrip().startswith("["):
            raise ValueError(
                f"{path} holds a JSON array, not one JSON object per line: name it .json"
            )
        try:
            row = _parse(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        except ValueError as e:  # a repeated key, or too deep
            raise ValueError(f"{path}: line {number}: {e}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is {_kind(row)}, not an object")
        rows += 1
    if rows == 0:
        raise ValueError(f"{path} has no rows")


def _holds_json_lines(path: Path) -> bool:
    """Whether ``path`` is JSON lines, read one line at a time: its first non-blank line is a
    whole JSON value, not an array. An array, or a first line that does not parse (the start of
    a pretty-printed object), makes the file one JSON document."""
    first = next((line for _, line in utf8_lines(path) if line.strip()), "")
    if first.lstrip().startswith("["):
        return False
    try:
        _parse(first)
    except json.JSONDecodeError:
        return False
    except ValueError:  # a repeated key or too deep: check_jsonl names the line
        pass
    return True


def check_json(path: Path) -> None:
    """JSON lines (as :func:`check_jsonl`), or one document: an array of objects (or of strings:
    text rows) or one object, as datasets' JSON reader takes them.

    Raises:
        ValueError: as :func:`utf8_lines`, a syntax error (with its line and column), items of
            another kind (the first one named), or no rows.
    """
    if _holds_json_lines(path):
        check_jsonl(path)
        return
    text = "".join(line for _, line in utf8_lines(path))  # one document: parsed whole, as datasets
    try:
        value = _parse(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})"
        ) from None
    except ValueError as e:  # a repeated key, or too deep
        raise ValueError(f"{path}: {e}") from None
    if isinstance(value, dict):
        return
    if not isinstance(value, list):
        raise ValueError(f"{path} is {_kind(value)}, not an array or object")
    if not value:
        raise ValueError(f"{path} has no rows")
    kind = str if isinstance(value[0], str) else dict  # datasets goes by the first item
    for index, item in enumerate(value):
        if not isinstance(item, kind):
            raise ValueError(
                f"{path}: item {index + 1} of the array is {_kind(item)}, not "
                f"{'a string' if kind is str else 'an object'}"
            )


def check_text(path: Path) -> None:
    """Lines of UTF-8 text.

    Raises:
        ValueError: as :func:`utf8_lines`.
    """
    for _ in utf8_lines(path):
        pass


def check_csv(path: Path) -> None:
    """Lines of UTF-8 text: a header and at least one row.

    Raises:
        ValueError: as :func:`utf8_lines`, or no row below the header.
    """
    lines = sum(1 for _, line in utf8_lines(path) if line.strip())
    if lines < 2:
        raise ValueError(f"{path} has no rows" + (" (only a header)" if lines else ""))
