"""Range checks that the config dataclasses run in ``__post_init__``: one line naming the option.

Each check is written so that NaN fails it (every comparison with NaN is false) and so that
``True`` does not pass for the integer 1.
"""

from __future__ import annotations

import math
import re

# The devices lorakit's --device documents.
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_number(
    name: str,
    value: object,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError unless ``value`` is a finite number (an ``int`` if ``integer``) within
    ``[low, high]`` (an end left open with ``low_open`` / ``high_open``, absent if None).

    Args:
        name: the option, as the message shows it.
    """
    kinds = (int,) if integer else (int, float)
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    ok = math.isfinite(value)
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        positive_integer = integer and low == 1 and high is None and not low_open
        rule = (
            "a positive integer" if positive_integer else _describe(low, high, low_open, high_open)
        )
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def check_device(value: object) -> None:
    """Raises ValueError unless ``value`` is a device lorakit's ``--device`` takes: ``auto``,
    ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
