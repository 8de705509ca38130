"""Writing a model directory to a path the user named (``--out`` of ``merge`` and ``convert``, the
GGUF cache) without losing anything: the new directory is written beside the path and renamed into
place, and what was there is replaced only on request and only if it is a model directory.

A mistyped ``--out`` with ``--overwrite`` (a home or project directory) must not be deleted, so
"a model directory" means one holding nothing but the files a saved Hugging Face model has, with
its ``config.json``.

A write killed before it could clean up (SIGKILL, a power cut) leaves its staging folder beside
the path, and that can hold a whole model. So each staging folder holds a lock file that its
writer keeps ``flock``-ed (the kernel drops the lock however the process ends); the next write to
the same path deletes the staging folders whose lock no process holds and leaves those of a write
still running.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from glob import escape as glob_escape
from pathlib import Path

MARKER = "config.json"
STAGING_LOCK = ".lorakit-staging.lock"
# What save_pretrained writes for a model and its tokenizer.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "chat_template*",
)


def check_replaceable(out: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuses an ``out`` that writing a model directory there would destroy.

    Nothing there, or an empty directory, is fine; a model directory only with ``overwrite``.
    ``out`` may never be, or contain, one of ``inputs`` or the current directory.

    Raises:
        FileExistsError, ValueError: naming ``out`` and what to do.
    """
    # Resolved, so that a symlinked alias of an input is caught too.
    target = out.resolve()
    kept = [(str(p), p.resolve()) for p in inputs]
    for what, source in [*kept, ("the current directory", Path.cwd().resolve())]:
        if source == target or target in source.parents:
            raise ValueError(f"--out {out} must not be or contain {what}")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is not a directory: choose another --out")
    entries = list(out.iterdir())
    if not entries:
        return
    if not (out / MARKER).is_file():
        raise FileExistsError(
            f"--out {out} holds files but no {MARKER}, so it is not a model directory: "
            "lorakit replaces only model directories; choose another --out"
        )
    strangers = sorted(
        e.name for e in entries if e.is_dir() or not any(fnmatch(e.name, p) for p in MODEL_FILES)
    )
    if strangers:
        raise FileExistsError(
            f"--out {out} holds {', '.join(strangers[:3])}, which no saved model has: lorakit "
            "replaces only model directories; choose another --out"
        )
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def replaced_atomically(out: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yields a path (not yet created) to write the new directory to; when the block ends without
    an exception, that directory takes the place of ``out``, otherwise it is deleted and ``out``
    is left as it was.

    ``check_replaceable`` runs on entry and again just before the swap (the block may take
    minutes, in which ``out`` can change). The old directory is moved aside, the new one renamed
    into place, then the old one deleted; if the second rename fails, the old one is put back.
    """
    check_replaceable(out, overwrite, inputs)
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), dir=out.parent))
    try:
        # Locked before it takes its name, so no other write ever sees it free.
        with (staging / f"{STAGING_LOCK}.new").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (staging / f"{STAGING_LOCK}.new").rename(staging / STAGING_LOCK)
            yield staging / "new"
            check_replaceable(out, overwrite, inputs)
            old = staging / "old"
            moved = out.exists() or out.is_symlink()
            if moved:
                out.rename(old)
            try:
                (staging / "new").rename(out)
            except BaseException:
                if moved:
                    old.rename(out)
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.staging-"


def remove_abandoned_staging(out: Path) -> list[Path]:
    """Deletes the staging folders of earlier writes to ``out`` that ended without cleaning up
    (no process holds their lock); returns them. The folders of a write still running are left
    alone, and so is anything without lorakit's lock file in it."""
    removed = []
    for folder in sorted(out.parent.glob(f"{glob_escape(_staging_prefix(out))}*")):
        lock_path = folder / STAGING_LOCK
        if folder.is_symlink() or not lock_path.is_file():
            continue
        with lock_path.open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is still running
            shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
