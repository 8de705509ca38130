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


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of ``path`` and its parents that exists, if it is no directory."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def check_room(path: Path, what: str) -> None:
    """Refuses ``path`` when a file stands where one of its parent folders must be (checked
    before a long computation whose result goes there).

    Raises:
        ValueError: naming ``what`` (the option and its value) and the file.
    """
    blocking = _file_in_the_way(path.parent)
    if blocking is not None:
        raise ValueError(f"{what}: {blocking} is a file, not a directory")


def make_dirs(path: Path, what: str) -> None:
    """``mkdir -p path``, where a file in the way is named (mkdir says "File exists" or "Not a
    directory" about one of the parents).

    Args:
        what: what the user named that needs ``path``, with its value (``--out run1``).

    Raises:
        ValueError: a file stands where ``path`` or one of its parents should be.
        OSError: another refusal (permissions), naming ``what``.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocking = _file_in_the_way(path)
        if blocking is not None:
            raise ValueError(f"{what}: {blocking} is a file, not a directory") from None
        raise OSError(f"cannot write {what}: {e.strerror or e}") from e
