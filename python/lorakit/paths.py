"""Checks of a path the user names, for what the operating system reports obscurely."""

from __future__ import annotations

from pathlib import Path


def check_link(path: Path, what: str) -> None:
    """Refuses a symlink that leads nowhere (broken, or a loop): the calls that meet one say
    "File exists" (mkdir), "does not exist" or "Symlink loop from" (resolve), not what it is.

    Raises:
        ValueError: naming ``what`` (the option) and ``path``.
    """
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{what} {path} is a symlink to nothing (broken, or a loop)")
