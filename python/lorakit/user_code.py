"""Errors raised by code the user hands in (a reward function, its module), told on one line
with where they arose in that code rather than deep in a library it called."""

from __future__ import annotations

import sysconfig
import traceback
from pathlib import Path

# Python's own library, installed packages and lorakit: a frame there is not the user's code.
_NOT_USER_CODE = tuple(
    {str(Path(p).resolve()) for k, p in sysconfig.get_paths().items() if "lib" in k}
    | {str(Path(__file__).resolve().parent)}
)


def raised_in_user_code(error: BaseException) -> str:
    """``error`` on one line with where it arose: the file and line of a syntax error, else of
    the innermost frame in the user's own files (the innermost frame when there is none)."""
    if isinstance(error, SyntaxError) and error.filename:
        message, where = error.msg, f"{error.filename}:{error.lineno}"
    else:
        frames = traceback.extract_tb(error.__traceback__)
        mine = [f for f in frames if not str(Path(f.filename).resolve()).startswith(_NOT_USER_CODE)]
        frame = (mine or frames)[-1]
        message, where = str(error), f"{frame.filename}:{frame.lineno}"
    return f"{type(error).__name__}: {message} (at {where})"
