"""Staging folders beside a path being replaced, and the cleanup of those a killed write left.

A write that is killed before it can clean up (SIGKILL, a power cut) leaves its staging folder
beside the path, and that can hold a whole model. So each staging folder holds a lock file that
its writer keeps ``flock``-ed, naming its host; the kernel drops the lock however the process
ends. The next write to the same path deletes the staging folders of its host whose lock is free.
It leaves alone the folders of a write still running, of another host (a lock taken on another
machine may not be visible here), and any folder holding one of its inputs. Where the file system
has no ``flock``, staging folders get no lock file and are never taken for abandoned.

A write killed between moving the old directory aside and moving the new one in leaves the only
copy of the old directory in its staging folder: the cleanup moves it back first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LOCK = ".lorakit-staging.lock"
OLD = "old"  # where replaced_atomically moves the directory it replaces
# flock's errors on file systems without it (some NFS and FUSE mounts).
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _prefix(out: Path) -> str:
    return f".{out.name}.staging-"


def _is_staging_of(name: str, out: Path) -> bool:
    # mkdtemp appends 8 characters of [a-z0-9_], so `.a.staging-b.staging-xxxxxxxx` (the folder
    # of `--out a.staging-b`) is not taken for one of `a`'s.
    return re.fullmatch(re.escape(_prefix(out)) + r"[a-z0-9_]{8}", name) is not None


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` (absolute), locked while the block runs, deleted after."""
    staging = Path(tempfile.mkdtemp(prefix=_prefix(out), dir=out.parent))
    try:
        with (staging / f"{LOCK}.new").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                yield staging  # no lock file by its name: never taken for abandoned
                return
            lock.write(f"{socket.gethostname()} {os.getpid()}\n")
            lock.flush()
            # Named only once locked, so no other write ever sees it free.
            (staging / f"{LOCK}.new").rename(staging / LOCK)
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_abandoned(out: Path, inputs: Sequence[Path] = ()) -> None:
    """Deletes the staging folders that killed writes to ``out`` (absolute) left on this host,
    after moving back a directory one of them had moved aside (see the module docstring)."""
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    kept = [p.resolve() for p in inputs]
    for entry in entries:
        if not _is_staging_of(entry.name, out) or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path).resolve()
        if any(folder == p or folder in p.parents for p in kept):
            continue
        try:
            _remove_if_abandoned(folder, out)
        except OSError:
            continue  # not ours to judge (another user's, or gone meanwhile)


def _remove_if_abandoned(folder: Path, out: Path) -> None:
    fd = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd) as lock:
        if lock.readline().split()[:1] != [socket.gethostname()]:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its writer is still running
        old = folder / OLD
        if present(old) and not present(out):
            old.rename(out)
        shutil.rmtree(folder, ignore_errors=True)


def present(path: Path) -> bool:
    """Whether anything is at ``path``, a dangling symlink included."""
    return path.exists() or path.is_symlink()
