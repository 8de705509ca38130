"""Refuses an adapter folder whose weights are not for the modules its config targets.

PEFT loads such a folder by its config: it wraps the ``target_modules`` only, warns about weights
for other modules and leaves targeted layers without weights at their initial values, a model
other than the one trained. lorakit reads both files and refuses the disagreement instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.peft.config import ALL_LINEAR, normalize_targets
from lorakit.peft.files import CONFIG_NAME, WEIGHTS_NAME
from lorakit.peft.inject import all_linear, matches_targets

# How many module names of each kind the error shows.
_SHOWN = 3


def check_targets_match(
    model: nn.Module,
    folder: Path,
    config: dict[str, Any],
    in_file: Iterable[str],
    candidates: set[str],
) -> None:
    """Raises ValueError unless ``config``'s ``target_modules`` pick exactly the modules that
    have weights in the file, as PEFT 0.21.2 picks them (``peft.tuners.tuners_utils.
    check_target_module_exists``): by :func:`~lorakit.peft.inject.matches_targets`, or
    ``"all-linear"``, less ``exclude_modules`` and the modules in or under ``modules_to_save``.

    Args:
        folder: the adapter folder, named in the error.
        config: the parsed ``adapter_config.json``.
        in_file: the modules that the weights file holds adapter weights for.
        candidates: the model's modules that the adapter's method can go on; a targeted one
            without weights is the error's second kind.
    """
    path = folder / CONFIG_NAME
    try:
        targets = normalize_targets(config.get("target_modules"))
        exclude = normalize_targets(config.get("exclude_modules"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if not targets:
        raise ValueError(
            f"{path}: target_modules is missing or empty; it names the adapted modules"
        )
    saved = config.get("modules_to_save") or []
    picked_all = set(all_linear(model, candidates)) if targets == ALL_LINEAR else set()

    def picks(module: str) -> bool:
        if exclude and matches_targets(module, exclude):
            return False
        if any(f".{m}." in f".{module}." for m in saved):  # PEFT never adapts inside these
            return False
        return module in picked_all if targets == ALL_LINEAR else matches_targets(module, targets)

    found = set(in_file)
    unnamed = sorted(m for m in found if not picks(m))
    missing = sorted(m for m in candidates if m not in found and picks(m))
    problems = []
    if unnamed:
        problems.append(f"it has weights for {_few(unnamed)}, which target_modules does not name")
    if missing:
        problems.append(f"target_modules names {_few(missing)}, which it has no weights for")
    if problems:
        raise ValueError(
            f"{folder}: {WEIGHTS_NAME} disagrees with {CONFIG_NAME}: {'; '.join(problems)}"
        )


def _few(names: list[str]) -> str:
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
