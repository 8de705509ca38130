"""One run at a time per output directory, and no leftovers of an interrupted one.

A run holds an exclusive ``flock`` on ``out/.lorakit.lock`` while it trains and saves, so two
runs on one directory cannot overwrite each other's checkpoints, ``latest`` or metrics, nor
resume each other's work. The kernel drops the lock when the process ends, however it ends, so
a killed run never leaves a stale lock behind (the file itself stays; it only names the holder).

Under torchrun, rank 0 alone takes the lock (it alone writes under ``out``; the other ranks only
read a checkpoint after rank 0 holds it) and tells the other ranks whether it got it, so that all
ranks of a refused run stop together instead of waiting in a collective. Ranks on other machines
therefore need no shared file system for the lock.

Once it holds the lock, a run removes what writes interrupted by a crash or Ctrl-C left in
``out`` (temporary checkpoint folders and ``.*.tmp`` files, see :data:`LEFTOVERS`): nothing else
can be writing them then.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from lorakit.paths import check_link, make_dirs
from lorakit.train import distributed

LOCK = ".lorakit.lock"
# Names of unfinished writes: checkpoint folders (checkpoint.save) and files written beside their
# final name (lorakit.file_writes.write_atomic: the adapter, metrics.jsonl, `latest`), in out and
# in the folders a run saves its result to.
LEFTOVERS = (".checkpoint-tmp-*", ".*.tmp")
RESULT_DIRS = ("", "adapter", "model")

_held: dict[Path, int] = {}  # out directories this process holds, with their nesting depth


@contextlib.contextmanager
def claim(out: Path) -> Iterator[None]:
    """Holds ``out``'s lock (creating ``out``) for the ``with`` block, after removing leftovers
    of interrupted writes. Nested claims of one directory by one process are allowed.

    Raises:
        ValueError: another process holds the lock (the message names it), or ``out`` is a
            symlink to nothing.
    """
    check_link(out, "--out")
    key = out.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    handle, error = None, None
    if distributed.is_main():
        handle, error = _lock(out)
    error = distributed.broadcast_from_main(error)
    if error is not None:
        raise ValueError(error)
    _held[key] = 1
    try:
        if handle is not None:
            remove_leftovers(out)
        yield
    finally:
        del _held[key]
        if handle is not None:
            handle.close()  # releases the lock


def _lock(out: Path) -> tuple[TextIO | None, str | None]:
    """The open, locked lock file, or the error to raise on every rank (none raised here:
    the other ranks wait for the broadcast)."""
    if out.exists() and not out.is_dir():
        return None, f"--out {out} is a file, not a directory: choose another --out"
    try:
        make_dirs(out, f"--out {out}")
    except (ValueError, OSError) as e:  # a file in the way, no permission: named
        return None, str(e)
    try:
        # "a+" neither truncates the holder's note before the lock is ours nor fails if absent.
        handle = (out / LOCK).open("a+", encoding="utf-8")
    except OSError as e:
        return None, f"cannot write to {out}: {e}"
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, (
            f"{out} is in use by another lorakit run ({holder}); wait for it to end or use "
            "another --out"
        )
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle, None


def remove_leftovers(out: Path) -> list[Path]:
    """Deletes the temporary files and folders of interrupted writes in ``out`` and its result
    folders; returns what it deleted. Call it only while holding ``out``'s lock."""
    removed = []
    for folder in (out / name for name in RESULT_DIRS):
        for pattern in LEFTOVERS:
            for path in folder.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed
