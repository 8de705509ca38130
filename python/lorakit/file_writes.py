"""Writing a file so that a failure leaves the old one whole and names the new one.

Checkpoints, adapters, metrics, plots and reports all go through :func:`write_atomic`.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import safetensors

# What a write that fails (a full disk, a read-only file system) raises: safetensors reports an
# I/O error as an exception of its own, which is no OSError.
WRITE_ERRORS = (OSError, safetensors.SafetensorError)


def write_error(path: Path, error: BaseException) -> OSError:
    """A failed write of ``path`` as one line that names it."""
    return OSError(f"cannot write {path}: {getattr(error, 'strerror', None) or error}")


def _mode_for(path: Path) -> int:
    """The permissions ``path`` keeps (its own if it exists), else those a plain ``open`` would
    give it: mkstemp's temporary file is readable by its owner only."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write`` on a temporary file beside ``path``, then renames it to ``path``.

    The rename is atomic on POSIX (same directory, same file system), so a reader or a crash sees
    either the old file or the complete new one, never a partial write.

    Raises:
        OSError: the write failed (the message names ``path``); the old file, if any, is kept
            and the temporary one removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fchmod(f.fileno(), _mode_for(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, WRITE_ERRORS):
            raise write_error(path, e) from e
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` of ``text`` in UTF-8."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def open_for_append(path: Path) -> BinaryIO:
    """``path`` opened to append without a buffer: after a failed write no bytes wait in one, to
    fail again, unnamed, when the file is closed."""
    return path.open("ab", buffering=0)


def append_text(file: BinaryIO, path: Path, text: str, sync: bool = False) -> None:
    """Appends ``text`` as UTF-8 to ``file`` (from :func:`open_for_append` on ``path``), and with
    ``sync`` waits until it is on disk.

    Raises:
        OSError: the write failed, naming ``path``; a line it tore is the reader's to drop.
    """
    data = memoryview(text.encode("utf-8"))
    try:
        while data:  # a raw write may take part of the bytes (a disk filling up)
            data = data[file.write(data) :]
        if sync:
            os.fsync(file.fileno())
    except OSError as e:
        raise write_error(path, e) from e
