"""Principles for constitutional self-critique: what a response is critiqued against and how it
is to be revised.

A principles file is YAML or JSON: a list of principles (or ``{"principles": [...]}``), each

- ``name``: a short identifier (unique), recorded in the trace and the summary;
- ``critique``: the request that asks the model to critique its last response against the
  principle;
- ``revision``: the request that asks it to rewrite that response given its critique;
- ``examples`` (optional): few-shot demonstrations, each with ``prompt``, ``response``,
  ``critique`` and ``revision`` strings, shown to the model as earlier turns of the conversation.

:data:`DEFAULT` is the set shipped with lorakit (``default_principles.yaml``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).with_name("default_principles.yaml")
EXAMPLE_FIELDS = ("prompt", "response", "critique", "revision")


@dataclass(frozen=True)
class Example:
    """One few-shot demonstration of a critique and a revision."""

    prompt: str
    response: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    examples: tuple[Example, ...] = ()


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        found = "missing" if value is None else f"got {type(value).__name__} {value!r:.40}"
        raise ValueError(f"{where}: '{key}' must be a non-empty string ({found})")
    return value.strip()


def _principle(entry: Any, where: str) -> Principle:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - {"name", "critique", "revision", "examples"})
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    examples = entry.get("examples")
    examples = [] if examples is None else examples
    if not isinstance(examples, list):
        raise ValueError(f"{where}: 'examples' must be a list, got {type(examples).__name__}")
    shots = []
    for i, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise ValueError(f"{where}: example {i} must be a mapping")
        shots.append(Example(*(_text(example, k, f"{where}: example {i}") for k in EXAMPLE_FIELDS)))
    return Principle(
        _text(entry, "name", where),
        _text(entry, "critique", where),
        _text(entry, "revision", where),
        tuple(shots),
    )


def parse_principles(loaded: Any, source: str) -> list[Principle]:
    """The principles of an already parsed file (see the module docstring).

    Raises:
        ValueError: not a non-empty list, or a bad principle (named by index and field).
    """
    if isinstance(loaded, Mapping) and set(loaded) == {"principles"}:
        loaded = loaded["principles"]
    if not isinstance(loaded, list) or not loaded:
        raise ValueError(f"{source} must hold a non-empty list of principles")
    principles = [_principle(entry, f"{source}: principle {i}") for i, entry in enumerate(loaded)]
    names = [p.name for p in principles]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{source}: principle names must be unique; repeated: {repeated}")
    return principles


def load_principles(path: str | Path = DEFAULT) -> list[Principle]:
    """The principles of a YAML (``.yaml`` / ``.yml``) or JSON file.

    Raises:
        ValueError: a missing or unparsable file, or bad principles (named by index and field).
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"principles file {path} is a directory")
    if not path.is_file():
        raise ValueError(f"principles file {path} does not exist")
    # Bytes: both parsers read UTF-8 or, by its byte-order mark, UTF-16 / UTF-32.
    data = path.read_bytes()
    try:
        loaded = json.loads(data) if path.suffix.lower() == ".json" else yaml.safe_load(data)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise ValueError(f"{path} is not valid {kind}: {' '.join(str(e).split())}") from None
    return parse_principles(loaded, str(path))
