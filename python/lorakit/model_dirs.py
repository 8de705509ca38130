"""Writing a model directory to a path the user named (``--out`` of ``merge`` and ``convert``, the
GGUF cache) without losing anything: the new directory is written beside the path and renamed into
place, and what was there is replaced only on request and only if it is a model directory.

A mistyped ``--out`` with ``--overwrite`` (a home or project directory) must not be deleted, so
"a model directory" means one holding nothing but the files a saved Hugging Face model has, with
its ``config.json``. What killed writes leave beside the path is cleaned up by the next write
(:mod:`lorakit.staging_dirs`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

from lorakit import staging_dirs
from lorakit.file_writes import WRITE_ERRORS, write_error
from lorakit.paths import check_link, check_room, make_dirs

MARKER = "config.json"
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
    ``out`` may never be, or contain, one of ``inputs`` or the current directory, nor lie
    inside one of ``inputs``.

    Raises:
        FileExistsError, ValueError: naming ``out`` and what to do.
    """
    check_link(out, "--out")
    check_room(out, f"--out {out}")
    # Resolved, so that a symlinked alias of an input is caught too.
    target = out.resolve()
    kept = [(str(p), p.resolve()) for p in inputs]
    for what, source in [*kept, ("the current directory", Path.cwd().resolve())]:
        if source == target or target in source.parents:
            raise ValueError(f"--out {out} must not be or contain {what}")
    for what, source in kept:
        if source in target.parents:  # the written model would sit inside an input
            raise ValueError(f"--out {out} must not be inside {what}: choose a place beside it")
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
    path = Path(os.path.abspath(out))
    staging_dirs.remove_abandoned(path, inputs)
    check_replaceable(out, overwrite, inputs)
    make_dirs(path.parent, f"--out {out}")
    with staging_dirs.staging_dir(path) as staging:
        try:
            yield staging / "new"
        except WRITE_ERRORS as e:  # a full disk: one line naming --out
            raise write_error(out, e) from e
        check_replaceable(out, overwrite, inputs)
        old = staging / staging_dirs.OLD
        moved = staging_dirs.present(path)
        if moved:
            path.rename(old)
        try:
            (staging / "new").rename(path)
        except BaseException:
            if moved:
                old.rename(path)
            raise
