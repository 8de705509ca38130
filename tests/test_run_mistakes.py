"""Mistakes and accidents around a training run: Ctrl-C, a diverging loss, corrupt or torn files,
a resume with other options, two runs on one directory, leftovers of interrupted writes."""

import fcntl
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.data.packing import Row
from lorakit.recipes.ppo import PPOConfig
from lorakit.recipes.sft import SFTConfig
from lorakit.train import Diverged, Interrupted, Trainer
from lorakit.train import metrics as metrics_module
from lorakit.train.metrics import read, rewrite
from lorakit.train.objectives import CausalLMObjective
from lorakit.train.out_dir import LOCK
from lorakit.train.resume_check import (
    DIGEST_VERSION,
    changed_options,
    data_digest,
    option_defaults,
)
from sft_helpers import qa_rows, saved_model
from test_user_mistakes import one_line_error

FAST = ["--batch-size", "4", "--no-progress", "--method", "lora", "--lora-r", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(12)))
    return str(path)


def run(model_dir, data, out, *extra: str) -> list[str]:
    argv = ["sft", "--model", str(model_dir), "--data", data, "--out", str(out), *FAST]
    return [*argv, "--val-fraction", "0", *extra]


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def stop_at(monkeypatch, step: int, error: type[BaseException]) -> None:
    """Makes optimizer step ``step`` (counted from 1) raise ``error`` before it changes anything."""
    original = Trainer._step

    def step_or_stop(self, index):
        if index == step - 1:
            raise error
        return original(self, index)

    monkeypatch.setattr(Trainer, "_step", step_or_stop)


# ---- Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_stops_with_one_line_naming_the_checkpoint(
    tmp_path, model_dir, data, capsys, monkeypatch
) -> None:
    out = tmp_path / "out"
    argv = run(model_dir, data, out, "--max-steps", "6", "--save-every", "2")
    stop_at(monkeypatch, 4, KeyboardInterrupt)
    err = one_line_error(capsys, argv, "interrupted after step 3 of 6", status=130)
    assert f"the last checkpoint is {out / 'checkpoint-2'}" in err
    monkeypatch.undo()
    assert main(argv) == 0
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # step 3 ran again after the resume


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path, model_dir, data, monkeypatch) -> None:
    from lorakit.cli import build_parser
    from lorakit.config_args import build
    from lorakit.recipes.sft import SFTConfig
    from lorakit.recipes.sft import run as sft_run

    args = build_parser().parse_args(run(model_dir, data, tmp_path / "out", "--max-steps", "4"))
    stop_at(monkeypatch, 2, KeyboardInterrupt)
    with pytest.raises(Interrupted, match=r"after step 1 of 4; no checkpoint in .* yet"):
        sft_run(build(SFTConfig, args, set(), {}))


# ---- divergence -------------------------------------------------------------------------------


def poison_loss_at(monkeypatch, step: int) -> None:
    """The objective's loss becomes NaN from optimizer step ``step`` on (one micro-batch each)."""
    original = CausalLMObjective.__call__
    calls = []

    def call(self, model, batch):
        out = original(self, model, batch)
        calls.append(1)
        if len(calls) >= step and model.training:
            out.loss_sum = out.loss_sum * math.nan
        return out

    monkeypatch.setattr(CausalLMObjective, "__call__", call)


def poison_gradient_at(monkeypatch, step: int) -> None:
    """The loss stays finite, one adapter gradient becomes infinite at optimizer step ``step``."""
    original = Trainer._step

    def step_with_hook(self, index):
        if index == step - 1:
            param = next(p for p in self.model.parameters() if p.requires_grad)
            param.register_hook(lambda g: g * math.inf)
        return original(self, index)

    monkeypatch.setattr(Trainer, "_step", step_with_hook)


@pytest.mark.parametrize(
    ("poison", "why"),
    [(poison_loss_at, "the loss is nan"), (poison_gradient_at, "the gradient norm is inf")],
)
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, model_dir, data, capsys, monkeypatch, poison, why
) -> None:
    out = tmp_path / "out"
    poison(monkeypatch, 3)
    argv = run(model_dir, data, out, "--max-steps", "6", "--save-every", "2")
    err = one_line_error(capsys, argv, f"training diverged at step 3: {why}")
    assert f"the last checkpoint is {out / 'checkpoint-2'}" in err
    assert (out / "latest").read_text() == "checkpoint-2"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    for tensor in load_file(str(out / "checkpoint-2" / "trainable.safetensors")).values():
        assert bool(torch.isfinite(tensor).all())
    assert not (out / "adapter").exists()  # no result saved from a diverged model


def test_nan_parameters_without_clipping_never_reach_a_checkpoint(
    tmp_path, model_dir, data, capsys, monkeypatch
) -> None:
    # --max-grad-norm 0: no norm is computed, so the infinite gradient of step 2 is applied.
    out = tmp_path / "out"
    poison_gradient_at(monkeypatch, 2)
    argv = run(
        model_dir, data, out, "--max-steps", "4", "--save-every", "1", "--max-grad-norm", "0"
    )
    err = one_line_error(capsys, argv, "diverged at step 2: a parameter is NaN or infinite")
    assert f"the last checkpoint is {out / 'checkpoint-1'}" in err
    assert (out / "latest").read_text() == "checkpoint-1"


def test_diverged_is_a_value_error_for_the_python_api() -> None:
    assert issubclass(Diverged, ValueError) and issubclass(Interrupted, KeyboardInterrupt)


# ---- corrupt and torn files -------------------------------------------------------------------


@pytest.fixture
def checkpointed(tmp_path, model_dir, data):
    """A run interrupted after its checkpoint of step 2 (of 4)."""
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(monkeypatch, 3, KeyboardInterrupt)
        assert main(run(model_dir, data, out, "--max-steps", "4", "--save-every", "2")) == 130
    return out


def resume(model_dir, data, out, *extra: str) -> list[str]:
    return run(model_dir, data, out, "--max-steps", "4", "--save-every", "2", *extra)


@pytest.mark.parametrize(
    "name", ["trainable.safetensors", "optimizer.safetensors", "rng.safetensors"]
)
def test_a_truncated_checkpoint_file_is_named(checkpointed, model_dir, data, capsys, name):
    path = checkpointed / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(capsys, resume(model_dir, data, checkpointed), f"{path} is not a readable")


def test_a_checkpoint_tensor_of_another_shape_is_named(checkpointed, model_dir, data, capsys):
    # As a checkpoint of a run with other adapter options would hold (PPO's value adapter
    # copies the reward adapter's options, for one).
    path = checkpointed / "checkpoint-2" / "trainable.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = tensors[name][:1].contiguous()
    save_file(tensors, str(path))
    one_line_error(capsys, resume(model_dir, data, checkpointed), f"{name} has shape [1, ")


@pytest.mark.parametrize("name", ["trainer.json", "optimizer.json"])
def test_corrupt_json_in_a_checkpoint_is_named(checkpointed, model_dir, data, capsys, name):
    path = checkpointed / "checkpoint-2" / name
    path.write_text("")
    one_line_error(capsys, resume(model_dir, data, checkpointed), f"{path} is not valid JSON")


def test_latest_naming_a_missing_checkpoint_is_one_line(checkpointed, model_dir, data, capsys):
    (checkpointed / "latest").write_text("checkpoint-9")
    one_line_error(capsys, resume(model_dir, data, checkpointed), "'checkpoint-9'")


def test_a_torn_last_metrics_line_does_not_block_resume(checkpointed, model_dir, data) -> None:
    log = checkpointed / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')  # killed while writing step 3
    assert main(resume(model_dir, data, checkpointed)) == 0
    assert steps_logged(checkpointed) == [1, 2, 3, 4]


def test_a_torn_line_inside_metrics_is_named(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not valid JSON"):
        read(log)


def test_metrics_are_rewritten_atomically(tmp_path, monkeypatch) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n')
    calls = []

    def dumps_then_fail(record):
        calls.append(record)
        if len(calls) == 2:
            raise OSError("disk full")
        return json.dumps(record)

    monkeypatch.setattr(metrics_module.json, "dumps", dumps_then_fail)
    with pytest.raises(OSError, match="disk full"):
        rewrite(log, [{"step": 1}, {"step": 2}])
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


# ---- resume with other options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--lr", "1e-3"], "train.lr 0.0002 -> 0.001"),
        (["--max-steps", "1"], "train.max_steps 4 -> 1"),
        (["--max-steps", "8"], "train.max_steps 4 -> 8"),
        (["--lora-r", "4"], "lora.r 2 -> 4"),
        (["--method", "qlora"], "model.method 'lora' -> 'qlora'"),
        (["--seq-len", "64"], "data.seq_len 512 -> 64"),
    ],
)
def test_a_resume_with_other_options_is_refused(
    checkpointed, model_dir, data, capsys, extra, expected
) -> None:
    err = one_line_error(capsys, resume(model_dir, data, checkpointed, *extra), expected)
    assert "--no-resume" in err


def test_other_data_is_refused_and_no_resume_starts_afresh(
    checkpointed, tmp_path, model_dir, capsys
) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(8)))
    one_line_error(capsys, resume(model_dir, str(other), checkpointed), "data.data [")
    fresh = ["--no-resume", "--lr", "1e-3", "--max-steps", "1", "--keep-checkpoints", "1"]
    assert main(resume(model_dir, str(other), checkpointed, *fresh)) == 0
    assert steps_logged(checkpointed) == [1]
    # The old run's checkpoint-2 is gone: kept, it would have counted among the newest
    # checkpoints and this run's checkpoint-1 would have been deleted instead.
    assert sorted(p.name for p in checkpointed.glob("checkpoint-*")) == ["checkpoint-1"]
    state = json.loads((checkpointed / "checkpoint-1" / "trainer.json").read_text())
    assert state["config"]["train"]["lr"] == 1e-3


def test_a_data_file_changed_under_its_path_is_refused(
    checkpointed, model_dir, data, capsys
) -> None:
    # The options were the same, so the run continued the checkpoint's position in other rows.
    rows = [{**r, "completion": " six"} for r in qa_rows(12)]
    with open(data, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    expected = "checkpoint-2 was trained on other rows (a data file or the tokenizer changed since)"
    err = one_line_error(capsys, resume(model_dir, data, checkpointed), expected)
    assert "--no-resume" in err


def test_the_data_digest_is_pinned_to_its_version() -> None:
    # Checkpoints keep the digest: an encoding that changes without a new DIGEST_VERSION would
    # refuse every resume from an older checkpoint as "trained on other rows".
    rows = [Row([5, 7], [-100, 7], [0, 1])]
    expected = "5931b29e08ef1ff0672399a648298ef8aa20311cee6494b28a002868b1670997"
    assert data_digest(rows, []) == f"{DIGEST_VERSION}:{expected}"
    assert data_digest(rows) != data_digest(rows, [])  # the sets are framed
    assert data_digest([Row([5, 7], [-100, 8], [0, 1])], []) != data_digest(rows, [])


def test_options_that_cannot_change_the_result_may_change(checkpointed, model_dir, data) -> None:
    extra = ["--log-every", "2", "--keep-checkpoints", "3", "--save-every", "1", "--progress"]
    argv = run(model_dir, data, checkpointed, "--max-steps", "4", *extra)
    assert main(argv) == 0
    assert (checkpointed / "latest").read_text() == "checkpoint-4"


def test_rerunning_a_finished_run_reports_its_last_loss(tmp_path, model_dir, data, capsys):
    out = tmp_path / "out"
    assert main(run(model_dir, data, out, "--max-steps", "2")) == 0
    first = capsys.readouterr().out
    assert main(run(model_dir, data, out, "--max-steps", "2")) == 0
    again = capsys.readouterr().out
    assert "last loss nan" not in again
    assert first.split("last loss")[1][:7] == again.split("last loss")[1][:7]


def test_changed_options_lists_each_difference() -> None:
    stored = {"train": {"lr": 1e-4, "progress": True, "out": "a"}, "model": {"method": "lora"}}
    current = {"train": {"lr": 1e-3, "progress": False, "out": "b"}, "model": {}}
    assert changed_options(stored, current, option_defaults(SFTConfig())) == [
        "model.method 'lora' -> (none)",
        "train.lr 0.0001 -> 0.001",
    ]


def test_an_option_newer_than_the_checkpoint_counts_as_its_default() -> None:
    # A checkpoint written before an option existed resumes while that option keeps its default,
    # whichever section of the run's config holds it.
    stored = {"train": {"lr": 1e-4}}
    defaults = option_defaults(PPOConfig())
    assert defaults["train.fused_ce"] is True and defaults["ppo.value_init"] == "auto"
    assert changed_options(stored, {"train": {"lr": 1e-4, "fused_ce": True}}, defaults) == []
    assert changed_options(stored, {"train": {"lr": 1e-4, "fused_ce": False}}, defaults) == [
        "train.fused_ce True -> False"
    ]
    assert (
        changed_options(stored, {"train": {"lr": 1e-4}, "ppo": {"value_init": "auto"}}, defaults)
        == []
    )
    assert changed_options(
        stored, {"train": {"lr": 1e-4}, "ppo": {"value_init": "zero"}}, defaults
    ) == ["ppo.value_init 'auto' -> 'zero'"]
    assert changed_options(stored, {"train": {"lr": 1e-4, "brand_new": 1}}, defaults) == [
        "train.brand_new (none) -> 1"
    ]


# ---- one run per directory --------------------------------------------------------------------


def test_a_second_run_on_one_directory_is_refused(tmp_path, model_dir, data, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with (out / LOCK).open("a+") as held:  # another process's lock (one open file = one owner)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        err = one_line_error(capsys, run(model_dir, data, out, "--max-steps", "1"), "in use")
        assert "pid 4242 on elsewhere" in err
        assert not (out / "latest").exists()
    assert main(run(model_dir, data, out, "--max-steps", "1")) == 0
    with (out / LOCK).open("a+") as free:  # released when the run ended
        fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_leftovers_of_interrupted_writes_are_removed(tmp_path, model_dir, data) -> None:
    out = tmp_path / "out"
    (out / ".checkpoint-tmp-x1y2").mkdir(parents=True)
    (out / ".checkpoint-tmp-x1y2" / "trainable.safetensors").write_bytes(b"half")
    (out / "adapter").mkdir()
    (out / "adapter" / ".adapter_model.safetensors.a1b2.tmp").write_bytes(b"half")
    (out / ".latest.tmp").write_text("checkpoint-")
    (out / ".metrics.jsonl.c3d4.tmp").write_text("{")
    (out / "notes.txt").write_text("mine")
    (out / ".hidden").write_text("mine too")
    assert main(run(model_dir, data, out, "--max-steps", "1")) == 0
    assert sorted(p.name for p in out.glob(".*")) == [".hidden", LOCK]
    assert not list((out / "adapter").glob(".*"))
    assert (out / "notes.txt").read_text() == "mine"
