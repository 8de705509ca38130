"""lorakit.model_dirs: what an --out with or without --overwrite may replace, and the swap."""

import errno
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit import staging_dirs
from lorakit.model_dirs import check_replaceable, replaced_atomically


def model_dir(path: Path, *extra: str) -> Path:
    path.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", *extra):
        (path / name).write_text(name)
    return path


def test_nothing_there_or_an_empty_directory_is_writable(tmp_path) -> None:
    check_replaceable(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", overwrite=False)


def test_a_model_directory_is_replaced_only_with_overwrite(tmp_path) -> None:
    out = model_dir(tmp_path / "m")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_replaceable(out, overwrite=False)
    check_replaceable(out, overwrite=True)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: model_dir(p, "notes.txt"), "holds notes.txt, which no saved model has"),
        (lambda p: (model_dir(p) / "src").mkdir(), "holds src, which no saved model has"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "no config.json"),
        (lambda p: p.write_text("x"), "is not a directory"),
    ],
)
def test_what_is_not_a_model_directory_is_never_replaced(tmp_path, make, expected) -> None:
    out = tmp_path / "out"
    make(out)
    with pytest.raises(FileExistsError, match=expected):
        check_replaceable(out, overwrite=True)


def test_out_may_not_be_or_contain_an_input_or_the_current_directory(tmp_path, monkeypatch):
    source = model_dir(tmp_path / "repo")
    with pytest.raises(ValueError, match="must not be or contain"):
        check_replaceable(tmp_path, overwrite=True, inputs=(source / "model.safetensors",))
    with pytest.raises(ValueError, match="must not be or contain"):
        check_replaceable(source, overwrite=True, inputs=(source,))
    # Nor lie inside one: the merged model would end up nested in the base model's folder.
    with pytest.raises(ValueError, match=r"must not be inside .*repo: choose a place beside it"):
        check_replaceable(source / "merged", overwrite=True, inputs=(source,))
    monkeypatch.chdir(source)
    with pytest.raises(ValueError, match="the current directory"):
        check_replaceable(Path("."), overwrite=True)
    check_replaceable(Path("merged"), overwrite=True)  # inside the current directory is fine


def test_the_new_directory_takes_the_old_ones_place(tmp_path) -> None:
    out = model_dir(tmp_path / "out")
    with replaced_atomically(out, overwrite=True) as new:
        model_dir(new)
        (new / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left


def test_a_failed_write_leaves_out_as_it_was(tmp_path) -> None:
    out = model_dir(tmp_path / "out")
    with pytest.raises(RuntimeError), replaced_atomically(out, overwrite=True) as new:
        model_dir(new)
        raise RuntimeError("interrupted")
    assert (out / "config.json").read_text() == "config.json"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_is_checked_again_before_the_swap(tmp_path) -> None:
    out = model_dir(tmp_path / "out")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        with replaced_atomically(out, overwrite=True) as new:
            model_dir(new)
            (out / "notes.txt").write_text("written meanwhile")
    assert (out / "notes.txt").read_text() == "written meanwhile"


def test_the_old_directory_comes_back_if_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    out = model_dir(tmp_path / "out")
    rename = Path.rename

    def failing(self: Path, target: Path) -> Path:
        if self.name == "new":
            raise OSError("no room")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="no room"), replaced_atomically(out, overwrite=True) as new:
        model_dir(new)
    assert (out / "config.json").read_text() == "config.json"


# A child that starts writing `out` and dies by SIGKILL with the write unfinished, as a killed
# `lorakit merge` does.
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from lorakit.model_dirs import replaced_atomically
with replaced_atomically(Path(sys.argv[1]), overwrite=True) as new:
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def abandoned(parent: Path, name: str, host: str | None = None) -> Path:
    """A staging folder as a killed write leaves it: its lock file, free, naming its host."""
    folder = parent / name
    folder.mkdir()
    (folder / staging_dirs.LOCK).write_text(f"{host or socket.gethostname()} 4242\n")
    (folder / "new").mkdir()
    return folder


def test_a_killed_writes_staging_folder_is_removed_by_the_next_write(tmp_path) -> None:
    out = model_dir(tmp_path / "out")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert len(list(tmp_path.iterdir())) == 2  # out and the staging folder
    with replaced_atomically(out, overwrite=True) as new:
        model_dir(new)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_staging_folder_of_a_write_still_running_is_kept(tmp_path) -> None:
    out = model_dir(tmp_path / "out")
    with staging_dirs.staging_dir(out) as running:
        with replaced_atomically(out, overwrite=True) as new:
            model_dir(new)
        assert running.is_dir()


def test_a_directory_moved_aside_by_a_killed_swap_is_moved_back(tmp_path) -> None:
    # Killed between moving the old directory aside and moving the new one in: the staging
    # folder holds the only copy of the old model, and out is missing.
    folder = abandoned(tmp_path, ".out.staging-abcd1234")
    model_dir(folder / staging_dirs.OLD)
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with replaced_atomically(out, overwrite=False):
            pass
    assert (out / "config.json").read_text() == "config.json"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_only_this_outs_abandoned_folders_of_this_host_are_removed(tmp_path) -> None:
    out = model_dir(tmp_path / "out")
    ours = abandoned(tmp_path, ".out.staging-abcd1234")
    kept = [
        abandoned(tmp_path, ".out.staging-b.staging-abcd1234"),  # --out out.staging-b's
        abandoned(tmp_path, ".out.staging-efgh5678", host="another-host"),
        abandoned(tmp_path, ".out.staging-ijkl9012"),  # holds an input (below)
        tmp_path / ".out.staging-mnop3456",  # no lock file: not lorakit's
    ]
    kept[-1].mkdir()
    model_dir(kept[2] / staging_dirs.OLD)
    with replaced_atomically(out, overwrite=True, inputs=[kept[2] / "old"]) as new:
        model_dir(new)
    assert not ours.exists()
    assert all(folder.is_dir() for folder in kept)


def test_without_flock_a_write_still_works_and_its_folder_is_never_taken_for_abandoned(
    tmp_path, monkeypatch
) -> None:
    def no_flock(*_args: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(staging_dirs.fcntl, "flock", no_flock)
    out = model_dir(tmp_path / "out")
    with replaced_atomically(out, overwrite=True) as new:
        model_dir(new)
        (new / "config.json").write_text("new")
        assert not (new.parent / staging_dirs.LOCK).exists()
    assert (out / "config.json").read_text() == "new"
