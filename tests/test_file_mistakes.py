"""A user's mistake with files and the environment: paths that are no file of the kind asked
for, permissions, text encodings, ``~`` and relative paths, a full disk, LORAKIT_CPU_ISA. Each
is exit status 2 and one line naming the file or option; what an editor writes (a byte-order
mark, CRLF, blank lines) trains as the plain file does."""

import errno
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import transformers
from safetensors.torch import load_file

from data_files import as_written_on_windows, write_as
from lorakit.cli import main
from lorakit.constitutional import Outputs, load_principles
from lorakit.constitutional import outputs as outputs_module
from lorakit.constitutional.loop import Record
from lorakit.file_writes import write_atomic
from lorakit.train import checkpoint, metrics
from lorakit.train.metrics import MetricsLog
from preference_helpers import pair_rows
from sft_helpers import qa_rows, saved_model
from test_constitutional import PRINCIPLES
from test_user_mistakes import FAST, one_line_error, sft, sft_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--method", "lora", "--lora-r", "2", "--val-fraction", "0", "--batch-size", "4"]
TRAIN += ["--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def data(tmp_path):
    return str(write_as(tmp_path / "data.jsonl", qa_rows(12), "jsonl"))


def denied(path: Path) -> bool:
    """Whether this process is refused ``path`` after a chmod (root, or CAP_DAC_OVERRIDE, is not:
    the permission cases are then untestable and skipped)."""
    return not os.access(path, os.R_OK | os.W_OK)


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# ---- paths that are no file of the kind asked for -----------------------------------------------


def test_a_model_that_is_a_file_says_what_model_takes(tmp_path, data, capsys) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    expected = f"{weights} is a file, not a model directory (with config.json) nor a GGUF file"
    one_line_error(capsys, sft(weights, data, tmp_path / "out", *FAST), expected)


@pytest.mark.parametrize("command", ["sft", "merge"])
def test_an_out_that_is_a_symlink_loop_says_so(tmp_path, model_dir, data, capsys, command):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(out)
    argv = sft(model_dir, data, out, *FAST)
    if command == "merge":
        argv = ["merge", "--model", str(model_dir), "--adapter", str(tmp_path), "--out", str(out)]
    one_line_error(capsys, argv, f"--out {out} is a symlink to nothing (broken, or a loop)")


def test_a_convert_out_below_a_file_is_refused_before_converting(tmp_path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.write_text("mine")
    argv = ["convert", "--gguf", str(tmp_path / "m.gguf"), "--out", str(taken / "model")]
    one_line_error(capsys, argv, f"--out {taken / 'model'}: {taken} is a file, not a directory")


def test_a_gguf_path_that_is_a_directory_is_one_line(tmp_path, data, capsys) -> None:
    folder = tmp_path / "m.gguf"
    folder.mkdir()
    argv = sft(folder, data, tmp_path / "out", *FAST)
    one_line_error(capsys, argv, f"GGUF file {folder} is a directory")


def test_a_lorakit_cache_that_is_a_file_is_one_line(tmp_path, data, capsys, monkeypatch):
    pytest.importorskip("gguf")
    taken = tmp_path / "cache"
    taken.write_text("mine")
    monkeypatch.setenv("LORAKIT_CACHE", str(taken))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")  # refused before it is read
    expected = f"the lorakit cache {taken} (LORAKIT_CACHE): {taken} is a file, not a directory"
    one_line_error(capsys, sft(model, data, tmp_path / "out", *FAST), expected)


def test_a_full_fine_tuning_never_replaces_its_own_model(tmp_path, data, capsys) -> None:
    run = tmp_path / "run"
    base = saved_model(run / "model")  # where --out run writes its result
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    capsys.readouterr()  # saving it showed a progress bar
    argv = sft(base, data, run, *TRAIN, "--method", "full", "--max-steps", "1")
    one_line_error(capsys, argv, f"--out {base} must not be or contain {base}")
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert not list(run.glob("checkpoint-*"))


def test_a_config_that_is_a_directory_is_one_line(tmp_path, capsys) -> None:
    one_line_error(capsys, ["sft", "--config", str(tmp_path)], f"config file {tmp_path} is a dir")


def test_a_data_symlink_loop_says_so(tmp_path, model_dir, capsys) -> None:
    loop = tmp_path / "a.jsonl"
    loop.symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(loop)
    expected = f"data path {loop} is a symlink to nothing (broken, or a loop)"
    one_line_error(capsys, sft(model_dir, str(loop), tmp_path / "out", *FAST), expected)


def every_command(tmp_path: Path, model_dir: Path, command: str) -> list[str]:
    """``command`` with the files it needs (no --out): data of its kind, a reward module."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in qa_rows(4)))
    reward = tmp_path / "reward.py"
    reward.write_text("def f(prompts, completions, **_):\n    return [1.0] * len(completions)\n")
    data = {
        "sft": write_as(tmp_path / "d.jsonl", qa_rows(8), "jsonl"),
        "dpo": write_as(tmp_path / "p.jsonl", pair_rows(8), "jsonl"),
        "grpo": prompts,
        "constitutional": prompts,
    }
    data.update(pretrain=data["sft"], reward=data["dpo"], ppo=prompts)
    argv = [command, "--model", str(model_dir), "--data", str(data[command])]
    if command in ("grpo", "ppo"):
        argv += ["--reward-function", f"{reward}:f"]
    return argv + (["--max-new-tokens", "2"] if command == "constitutional" else FAST)


COMMANDS = ["sft", "pretrain", "dpo", "reward", "grpo", "ppo", "constitutional"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_that_is_a_file_is_one_line_for_every_command(
    tmp_path, model_dir, capsys, command
) -> None:
    out = tmp_path / "taken"
    out.write_text("mine")
    argv = [*every_command(tmp_path, model_dir, command), "--out", str(out)]
    one_line_error(capsys, argv, f"--out {out} is a file, not a directory: choose another --out")
    assert out.read_text() == "mine"


def test_an_adapter_that_is_a_file_names_it(tmp_path, model_dir, capsys) -> None:
    taken = tmp_path / "adapter"
    taken.write_text("mine")
    argv = [*every_command(tmp_path, model_dir, "grpo"), "--out", str(tmp_path / "out")]
    expected = f"{taken} is a file, not an adapter directory (an adapter directory holds"
    one_line_error(capsys, [*argv, "--init-adapter", str(taken)], expected)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("dir", None, "is a directory"),
        ("p.yaml", b"- name: caf\xe9\n", "p.yaml is not valid YAML: "),
        ("p.json", b'[{"name": "caf\xe9"}]', "p.json is not valid JSON: "),
    ],
)
def test_an_unreadable_principles_file_is_named(
    tmp_path, model_dir, capsys, name, content, expected
) -> None:
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    argv = [*every_command(tmp_path, model_dir, "constitutional"), "--out", str(tmp_path / "o")]
    one_line_error(capsys, [*argv, "--principles", str(path)], expected)


def test_principles_in_utf16_with_a_byte_order_mark_are_read(tmp_path) -> None:
    import yaml

    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(PRINCIPLES))
    wide = tmp_path / "wide.yaml"
    wide.write_bytes(plain.read_text().encode("utf-16"))
    assert load_principles(wide) == load_principles(plain)


def test_an_out_below_a_file_is_one_line(tmp_path, model_dir, data, capsys) -> None:
    out = Path(data) / "out" / "run"
    expected = f"--out {out}: {data} is a file, not a directory"
    one_line_error(capsys, sft(model_dir, data, out, *FAST), expected)


def test_an_out_in_a_read_only_directory_is_one_line(tmp_path, model_dir, data, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if not denied(locked):
        pytest.skip("this process may write anywhere (root)")
    out = locked / "out"
    expected = f"cannot write --out {out}: Permission denied"
    one_line_error(capsys, sft(model_dir, data, out, *FAST), expected)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_a_data_file_without_read_permission_is_one_line(tmp_path, model_dir, capsys, suffix):
    path = write_as(tmp_path / f"data.{suffix}", qa_rows(4), suffix)
    path.chmod(0)
    if not denied(path):
        pytest.skip("this process may read anything (root)")
    err = one_line_error(capsys, sft(model_dir, str(path), tmp_path / "out", *FAST), str(path))
    assert "Permission denied" in err


# ---- text encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "suffix"), [("sft", "jsonl"), ("sft", "json"),
                         ("sft", "csv"), ("pretrain", "txt")])  # fmt: skip
def test_a_file_saved_with_bom_crlf_and_blank_lines_trains_as_the_plain_one(
    tmp_path, model_dir, command, suffix
) -> None:
    plain = tmp_path / f"plain.{suffix}"
    if suffix == "txt":
        plain.write_text("".join(r["prompt"] + r["completion"] + "\n" for r in qa_rows(12)))
    else:
        write_as(plain, qa_rows(12), suffix)
    messy = tmp_path / f"messy.{suffix}"
    messy.write_bytes(as_written_on_windows(plain.read_bytes(), suffix))
    for path in (plain, messy):
        argv = [command, "--model", str(model_dir), "--data", str(path), *TRAIN]
        assert main([*argv, "--max-steps", "2", "--out", str(tmp_path / path.stem)]) == 0
    # The same rows in the same order: the same computation, bit for bit.
    expected = adapter(tmp_path / "plain")
    assert adapter(tmp_path / "messy").keys() == expected.keys()
    for name, tensor in adapter(tmp_path / "messy").items():
        assert tensor.equal(expected[name]), name


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_yaml_config_with_a_byte_order_mark_is_read(tmp_path, encoding) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes("lr: 3.0e-4\nmodel: {method: lora}\n".encode(encoding))
    config = sft_config("--config", str(path))
    assert (config.train.lr, config.model.method) == (3e-4, "lora")


# ---- ~ and relative paths -----------------------------------------------------------------------


def test_a_tilde_in_paths_is_the_home_directory(tmp_path, model_dir, monkeypatch) -> None:
    # A shell leaves --out=~/run and YAML values as they are; lorakit expands them.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    write_as(tmp_path / "data.jsonl", qa_rows(12), "jsonl")
    config = tmp_path / "run.yaml"
    config.write_text("data: [~/data.jsonl]\n")
    argv = ["sft", "--config=~/run.yaml", f"--model={model_dir}", "--out=~/run", *TRAIN]
    assert main([*argv, "--max-steps", "1"]) == 0
    assert (tmp_path / "run" / "adapter").is_dir()
    assert not (tmp_path / "~").exists()
    assert sft_config("--config=~/run.yaml").data.data == [str(tmp_path / "data.jsonl")]


@pytest.mark.parametrize("command", ["sft", "demo"])
def test_an_empty_out_is_refused_not_the_current_directory(tmp_path, capsys, command) -> None:
    argv = [command, "--out", ""] + (
        ["--model", "m", "--data", "d.jsonl"] if command == "sft" else []
    )
    one_line_error(capsys, argv, f"lorakit {command}: error: --out needs a path, got ''")


def test_relative_paths_in_yaml_are_relative_to_the_current_directory(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("data: [data.jsonl]\nout: run\n")
    monkeypatch.chdir(tmp_path)
    config = sft_config("--config", "configs/run.yaml")
    assert (config.data.data, config.train.out) == (["data.jsonl"], "run")


# ---- a full disk --------------------------------------------------------------------------------

# What each writer raises on a full disk: safetensors its own error, which is no OSError.
DISK_FULL = [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    ),
]


def leftovers(out: Path) -> list[str]:
    """Hidden files and folders under ``out`` but the run's lock: unfinished writes."""
    return [str(p) for p in out.rglob(".*") if p.name != ".lorakit.lock"]


@pytest.mark.parametrize("error", DISK_FULL, ids=type)
def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(
    tmp_path, model_dir, data, capsys, monkeypatch, error
) -> None:
    out = tmp_path / "out"
    argv = sft(model_dir, data, out, *TRAIN, "--save-every", "1", "--max-steps", "2")
    write = checkpoint.save_file
    before = {}

    def full_after_the_first(tensors, path, *args, **kwargs):
        if (out / "latest").exists():  # checkpoint-1 is complete: the disk is full now
            before.update({p.name: p.read_bytes() for p in (out / "checkpoint-1").iterdir()})
            raise error
        write(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_after_the_first)
    err = one_line_error(capsys, argv, f"cannot write {out}/checkpoint-2: ")
    assert "No space left on device" in err
    assert (out / "latest").read_text() == "checkpoint-1"
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-1").iterdir()} == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert leftovers(out) == []


@pytest.mark.parametrize("error", DISK_FULL, ids=type)
def test_a_full_disk_at_the_adapter_leaves_no_partial_file(
    tmp_path, model_dir, data, capsys, monkeypatch, error
) -> None:
    def full(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    expected = f"cannot write {out}/adapter/adapter_model.safetensors: "
    one_line_error(capsys, sft(model_dir, data, out, *TRAIN, "--max-steps", "1"), expected)
    assert not (out / "adapter" / "adapter_model.safetensors").exists()
    assert leftovers(out) == []


def test_a_full_disk_at_a_full_models_save_keeps_the_earlier_model(
    tmp_path, model_dir, data, capsys, monkeypatch
) -> None:
    out = tmp_path / "out"
    argv = sft(model_dir, data, out, *TRAIN, "--method", "full", "--no-resume")
    assert main([*argv, "--max-steps", "1"]) == 0
    before = {p.name: p.read_bytes() for p in (out / "model").iterdir()}

    def full(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise DISK_FULL[1]

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    one_line_error(capsys, [*argv, "--max-steps", "2"], f"cannot write {out}/model: ")
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == before
    assert [p for p in leftovers(out) if "staging" in p] == []


def test_a_full_disk_while_appending_constitutional_rows_names_the_file(
    tmp_path, monkeypatch
) -> None:
    outputs = Outputs(tmp_path / "out", {"o": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    record = Record(id=0, prompt=[{"role": "user", "content": "hi"}], response="hello")
    expected = f"cannot write {tmp_path / 'out' / 'sft.jsonl'}: No space left on device"
    with pytest.raises(OSError, match=re.escape(expected)):
        outputs.append(record, 1.0)
    outputs.close()


class _FillingDisk(io.FileIO):
    """A file on a disk with room for ``room`` more bytes: a write takes what fits, the next one
    fails with ENOSPC, as a real full disk behaves."""

    room = 10

    def write(self, data: bytes) -> int:
        if _FillingDisk.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        taken = min(len(data), _FillingDisk.room)
        _FillingDisk.room -= taken
        return super().write(bytes(data[:taken]))


def _metrics_row(path: Path) -> tuple[object, Callable[[], None]]:
    log = MetricsLog(path)
    return log, lambda: log.write({"step": 1, "loss": 2.0})


def _constitutional_row(path: Path) -> tuple[object, Callable[[], None]]:
    outputs = Outputs(path.parent, {"o": 1})
    record = Record(id=0, prompt=[{"role": "user", "content": "hi"}], response="hello")
    return outputs, lambda: outputs.append(record, 1.0)


@pytest.mark.parametrize(
    ("module", "make", "name"),
    [(metrics, _metrics_row, "metrics.jsonl"), (outputs_module, _constitutional_row, "sft.jsonl")],
)
def test_a_disk_filling_up_during_an_append_names_the_file_and_closing_is_quiet(
    tmp_path, monkeypatch, module, make, name
) -> None:
    # A buffered file kept the bytes a full disk refused and failed again, naming no file, when
    # the run closed it; appends go unbuffered, so the first failure is the only one.
    monkeypatch.setattr(_FillingDisk, "room", 10)
    monkeypatch.setattr(module, "open_for_append", lambda path: _FillingDisk(path, "ab"))
    writer, append = make(tmp_path / name)
    expected = f"cannot write {tmp_path / name}: No space left on device"
    with pytest.raises(OSError, match=re.escape(expected)):
        append()
    writer.close()
    assert len((tmp_path / name).read_bytes()) == 10  # the torn line a resume cuts off


# ---- the environment ---------------------------------------------------------------------------


def test_an_unknown_cpu_isa_stops_a_run_that_calls_no_kernel(tmp_path, model_dir, data) -> None:
    # LoRA on the CPU runs no lorakit kernel, so the kernels' own check never ran.
    env = {**os.environ, "LORAKIT_CPU_ISA": "avx1024"}
    argv = sft(model_dir, data, tmp_path / "out", *TRAIN, "--max-steps", "1")
    done = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *argv], env=env, cwd=ROOT, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "lorakit sft: error: LORAKIT_CPU_ISA='avx1024' is no level; use one of scalar, avx2, "
        "avx512, avx512_bf16\n"
    )
    assert not (tmp_path / "out").exists()


def test_atomic_writes_keep_the_permissions_a_plain_write_gives(tmp_path) -> None:
    # mkstemp makes its file readable by its owner only, and the rename kept that mode.
    old = os.umask(0o022)
    try:
        new = tmp_path / "new.txt"
        write_atomic(new, lambda tmp: tmp.write_text("a"))
        kept = tmp_path / "kept.txt"
        kept.write_text("a")
        kept.chmod(0o640)
        write_atomic(kept, lambda tmp: tmp.write_text("b"))
    finally:
        os.umask(old)
    assert (new.stat().st_mode & 0o777, new.read_text()) == (0o644, "a")
    assert (kept.stat().st_mode & 0o777, kept.read_text()) == (0o640, "b")
