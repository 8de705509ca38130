"""Which options a resumed run may change: those that cannot change what it computes.

A checkpoint stores every option of its run (``trainer.json``'s ``config``). A resume continues
the stored run exactly (same data order, schedule and loss) only if the options that shape the
result are the same, so any other difference is refused and listed. These may differ:

- where the run writes and how it reports: ``out``, ``progress``, ``log_every``, ``report_to``,
  ``kl_warn`` (GRPO / PPO: when a warning is printed);
- how often and how many checkpoints it keeps: ``save_every``, ``keep_checkpoints``;
- ``resume`` itself;
- where and how memory is spent, which leaves the arithmetic alone: ``device``,
  ``gradient_checkpointing`` (recomputes the same activations), ``optim_page_budget_mb``
  (moves optimizer state, not its values).

An option the checkpoint does not store at all (one added to lorakit after it was written) is
taken to have had its default (:func:`option_defaults`), so a run resumed by a newer lorakit is
refused only when the new option is set to something else.

The rows themselves are compared too, by :func:`data_digest`: a data file rewritten under the
same path (or another tokenizer) would give a run that continues the checkpoint's position in
other rows.

Everything else is compared, including ``max_steps`` and ``epochs`` (they set the length of the
learning-rate schedule, so a longer run is not the shorter one continued) and ``eval_every`` /
``patience`` (they decide when early stopping ends the run). To train on with other options,
start afresh with ``--no-resume``.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FREE = frozenset(
    {
        "out",
        "progress",
        "log_every",
        "report_to",
        "kl_warn",
        "save_every",
        "keep_checkpoints",
        "resume",
        "device",
        "gradient_checkpointing",
        "optim_page_budget_mb",
    }
)


def _flat(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stored_options(config: Any) -> dict[str, Any]:
    """The run config ``config`` (a dataclass whose sections may be dataclasses) as a checkpoint
    stores it: nested dicts of JSON values."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def option_defaults(config: Any) -> dict[str, Any]:
    """Every option of the run config ``config`` at its default, by the name a checkpoint
    stores it under (``section.option``)."""
    return _flat(stored_options(type(config)()))


def changed_options(
    stored: dict[str, Any], current: dict[str, Any], defaults: Mapping[str, Any]
) -> list[str]:
    """``"name stored -> current"`` for each option outside :data:`FREE` that differs; both are
    JSON-like nested dicts. An option only the current run has is compared with its default in
    ``defaults`` (by its full name, as :func:`option_defaults` gives them); any other option
    only one side has counts as changed."""
    old, new = _flat(stored), _flat(current)
    missing = object()
    changed = []
    for name in sorted(old.keys() | new.keys()):
        if name.rsplit(".", 1)[-1] in FREE:
            continue
        before, after = old.get(name, missing), new.get(name, missing)
        if before is missing:
            before = defaults.get(name, missing)
        if before != after:
            shown = ["(none)" if v is missing else repr(v) for v in (before, after)]
            changed.append(f"{name} {shown[0]} -> {shown[1]}")
    return changed


# The encoding of :func:`data_digest`: a checkpoint's digest of another version is not compared.
# Change it with the encoding (names or fields of the row classes included).
DIGEST_VERSION = "rows-v1"


def data_digest(*row_sets: Sequence[Any]) -> str:
    """``DIGEST_VERSION:`` and the SHA-256 of the rows a run takes (prepared rows, pairs or
    prompts), set by set and in order."""
    digest = hashlib.sha256()
    for rows in row_sets:
        digest.update(f"{len(rows)} rows\n".encode())
        for row in rows:
            _hash_value(digest, row)
    return f"{DIGEST_VERSION}:{digest.hexdigest()}"


def _hash_value(digest: Any, value: Any) -> None:
    """Feeds ``value`` to ``digest``: a dataclass field by field, a list of token ids as
    64-bit integers (3x faster than its ``repr``), anything else (numbers, strings, messages)
    by its ``repr``, which is exact for them. Each part is framed by its kind and length."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(f"{type(value).__name__}(".encode())
        for field in dataclasses.fields(value):
            _hash_value(digest, getattr(value, field.name))
        digest.update(b")")
        return
    if isinstance(value, list):
        try:
            ids = array.array("q", value).tobytes()
        except (TypeError, OverflowError):
            pass
        else:
            digest.update(f"ids {len(value)}:".encode() + ids)
            return
    text = repr(value).encode()
    digest.update(f"{len(text)}:".encode() + text)


def check_resume(
    path: Path,
    stored: dict[str, Any],
    run_config: dict[str, Any],
    defaults: Mapping[str, Any],
    world_size: int,
    data: str,
) -> None:
    """Refuses to resume from checkpoint ``path`` (its trainer state ``stored``) a run with other
    options (:func:`changed_options` against ``run_config``, options newer than the checkpoint
    taken at their ``defaults``), another number of processes (the data each rank takes and
    its random stream depend on it) or other rows (``data``, a :func:`data_digest`; checkpoints
    that stored none, or one of another :data:`DIGEST_VERSION`, are not compared).

    Raises:
        ValueError: naming the checkpoint and every difference.
    """
    written_by = stored.get("world_size", 1)
    if written_by != world_size:
        raise ValueError(
            f"{path} was written by {written_by} process(es), this run has {world_size}: "
            "resume with as many, or start afresh with --no-resume"
        )
    changed = changed_options(stored.get("config", {}), run_config, defaults)
    if changed:
        raise ValueError(
            f"{path} was trained with other options ({'; '.join(changed)}): rerun with the "
            "same options, or start afresh with --no-resume"
        )
    stored_data = stored.get("data")
    comparable = isinstance(stored_data, str) and stored_data.startswith(f"{DIGEST_VERSION}:")
    if comparable and stored_data != data:
        raise ValueError(
            f"{path} was trained on other rows (a data file or the tokenizer changed since): "
            "rerun on the same data, or start afresh with --no-resume"
        )
