"""Writing a model directory to a path the user named (``--out`` of ``merge`` and ``convert``, the
GGUF cache) without losing anything: the new directory is written beside the path and renamed into
place whole, and what was there is replaced only on request and only if it is a model directory.

A mistyped ``--out`` with ``--overwrite`` (a home or project directory) must not be deleted, so
"a model directory" means one with a ``config.json``, as every Hugging Face model directory has.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = "config.json"


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuses an ``out`` that writing a model directory there would destroy.

    Nothing there, or an empty directory, is fine; a model directory only with ``overwrite``.

    Raises:
        FileExistsError: naming ``out`` and what to do.
    """
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory: choose another --out")
    if not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise FileExistsError(
            f"--out {out} holds files but no {MARKER}, so it is not a model directory: "
            "lorakit replaces only model directories; choose another --out"
        )
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def replaced_atomically(out: Path) -> Iterator[Path]:
    """Yields a path (not yet created) to write the new directory to; when the block ends without
    an exception, that directory takes the place of ``out`` (the old one, if any, is deleted),
    otherwise it is deleted and ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging / "new"
        if out.exists() or out.is_symlink():
            out.rename(staging / "old")
        (staging / "new").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
