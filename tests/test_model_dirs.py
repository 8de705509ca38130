"""lorakit.model_dirs: what an --out with or without --overwrite may replace, and the swap."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
    monkeypatch.chdir(source)
    with pytest.raises(ValueError, match="the current directory"):
        check_replaceable(Path("."), overwrite=True)


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


# A child that starts writing `out` and then waits (holding its staging folder) or dies by SIGKILL
# with the write unfinished, as a killed `lorakit merge` does.
WRITER = """
import os, signal, sys, time
from pathlib import Path
from lorakit.model_dirs import replaced_atomically
with replaced_atomically(Path(sys.argv[1]), overwrite=True) as new:
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"x" * 4096)
    print("writing", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def start_writer(out: Path, how: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), how], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "writing\n"
    return child


def test_a_killed_writes_staging_is_removed_by_the_next_write_and_a_running_ones_kept(tmp_path):
    out = model_dir(tmp_path / "out")
    killed = start_writer(out, "die")
    assert killed.wait(timeout=60) == -signal.SIGKILL
    (abandoned,) = [p for p in tmp_path.iterdir() if p.name != "out"]
    running = start_writer(out, "wait")
    try:
        # The second writer removed the first one's folder; this third write keeps the second's.
        (live,) = [p for p in tmp_path.iterdir() if p.name != "out"]
        assert live != abandoned
        with replaced_atomically(out, overwrite=True) as new:
            model_dir(new)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
    finally:
        running.kill()
        running.wait(timeout=60)


def test_folders_that_look_like_staging_without_lorakits_lock_are_left_alone(tmp_path):
    out = model_dir(tmp_path / "out")
    theirs = tmp_path / ".out.staging-mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with replaced_atomically(out, overwrite=True) as new:
        model_dir(new)
    assert (theirs / "notes.txt").read_text() == "keep"
