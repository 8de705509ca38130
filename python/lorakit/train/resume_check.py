"""Which options a resumed run may change: those that cannot change what it computes.

A checkpoint stores every option of its run (``trainer.json``'s ``config``). A resume continues
the stored run exactly (same data order, schedule and loss) only if the options that shape the
result are the same, so any other difference is refused and listed. These may differ:

- where the run writes and how it reports: ``out``, ``progress``, ``log_every``, ``report_to``;
- how often and how many checkpoints it keeps: ``save_every``, ``keep_checkpoints``;
- ``resume`` itself;
- where and how memory is spent, which leaves the arithmetic alone: ``device``,
  ``gradient_checkpointing`` (recomputes the same activations), ``optim_page_budget_mb``
  (moves optimizer state, not its values).

Everything else is compared, including ``max_steps`` and ``epochs`` (they set the length of the
learning-rate schedule, so a longer run is not the shorter one continued) and ``eval_every`` /
``patience`` (they decide when early stopping ends the run). To train on with other options,
start afresh with ``--no-resume``.
"""

from __future__ import annotations

from typing import Any

FREE = frozenset(
    {
        "out",
        "progress",
        "log_every",
        "report_to",
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


def changed_options(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name stored -> current"`` for each option outside :data:`FREE` that differs (an option
    only one side has counts as changed); both are JSON-like nested dicts."""
    old, new = _flat(stored), _flat(current)
    missing = object()
    changed = []
    for name in sorted(old.keys() | new.keys()):
        if name.rsplit(".", 1)[-1] in FREE:
            continue
        before, after = old.get(name, missing), new.get(name, missing)
        if before != after:
            shown = ["(none)" if v is missing else repr(v) for v in (before, after)]
            changed.append(f"{name} {shown[0]} -> {shown[1]}")
    return changed
