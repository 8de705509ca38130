"""`lorakit sft` under torchrun: 2 CPU processes (gloo) train as one process with twice the
gradient accumulation, only rank 0 writes, and a resumed DDP run repeats the same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from sft_helpers import saved_model

NUMBERS = "one two three four five six".split()
# The workers import the lorakit that this test imported: the installed wheel in CI, the source
# tree (with its in-place build) in development.
PYTHON_DIR = Path(lorakit.__file__).resolve().parents[1]


def varied_rows(n: int) -> list[dict[str, str]]:
    # Prompts and completions of different lengths: the micro-batches of the two ranks hold
    # different numbers of trained tokens, so the loss must be weighted by the global count.
    return [
        {
            "prompt": "question : what is " + " ".join(NUMBERS[: 1 + i % 5]) + " ?",
            "completion": " " + " ".join(NUMBERS[i % 6 : i % 6 + 1 + i % 3]),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(20)))
    return saved_model(root / "model"), data


def argv(inputs: tuple[Path, Path], out: Path, grad_accum: int) -> list[str]:
    model, data = inputs
    return [
        "sft", "--model", str(model), "--data", str(data), "--method", "lora", "--out", str(out),
        "--lora-r", "4", "--dedup", "none", "--no-pack", "--val-fraction", "0.2",
        "--batch-size", "2", "--grad-accum", str(grad_accum), "--max-steps", "4",
        "--save-every", "2", "--eval-every", "2", "--lr", "1e-2", "--no-progress",
    ]  # fmt: skip


def torchrun(args: list[str]) -> str:
    """Runs ``lorakit`` as 2 workers of torchrun; returns their stdout."""
    # One thread per worker: the two share a 2-core machine. --standalone picks a free port.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR), env.get("PYTHONPATH", "")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, "--nproc_per_node", "2", "-m", "lorakit.cli", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def records(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_single_threaded(args: list[str]) -> None:
    """Runs ``lorakit`` in this process on one torch thread, as each torchrun worker runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def assert_same_metrics(
    ours: list[dict[str, float]],
    theirs: list[dict[str, float]],
    keys: list[str],
    **tolerance: float,
) -> None:
    """Each metric in ``keys`` logged at the same steps by both runs, values within ``tolerance``
    (``pytest.approx``'s ``rel`` / ``abs``)."""
    for key in keys:
        got = [r[key] for r in ours if key in r]
        expected = [r[key] for r in theirs if key in r]
        assert len(got) == len(expected) > 0, key
        assert got == pytest.approx(expected, **tolerance), key


def curve(history: list[dict[str, float]]) -> list[tuple[float, ...]]:
    return [(r["step"], r["loss"], r["lr"], r.get("val_loss", -1.0)) for r in history]


def test_two_processes_train_as_one_with_twice_the_accumulation(inputs, tmp_path, capsys) -> None:
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    printed = torchrun(argv(inputs, ddp, grad_accum=2))
    run_single_threaded(argv(inputs, single, grad_accum=4))

    # The same rows per step, the same token-weighted mean; the ranks' gradients are summed in
    # another order than one process accumulates them (float32 rounding, ~1e-7 relative), which
    # four Adam steps carry into the losses at about that size. Adam and clipping hardly change
    # when every gradient is scaled alike, so the gradient norm checks the scale itself.
    ours, theirs = records(ddp), records(single)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    assert_same_metrics(ours, theirs, ["loss", "val_loss", "grad_norm"], rel=1e-5)
    adapters = [load_file(out / "adapter" / "adapter_model.safetensors") for out in (ddp, single)]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        torch.testing.assert_close(value, adapters[1][key], rtol=1e-4, atol=1e-5)

    # Rank 0 alone writes and prints: one record per step (two writers would append twice),
    # one summary, and each rank's RNG in the checkpoint (written by rank 0).
    assert printed.count("trained 4 steps") == 1
    names = sorted(p.name for p in ddp.iterdir())
    assert names == [".lorakit.lock", "adapter", "checkpoint-2", "checkpoint-4", "latest",
                     "loss.png", "metrics.jsonl"]  # fmt: skip
    saved = sorted(p.name for p in (ddp / "checkpoint-4").iterdir())
    assert "rng.safetensors" in saved and "rng-rank1.safetensors" in saved
    trainer_state = json.loads((ddp / "checkpoint-4" / "trainer.json").read_text())
    assert trainer_state["world_size"] == 2 and trainer_state["micro_batch"] == 16

    # Resuming a 2-process checkpoint in one process would read other batches: refused.
    assert main(argv(inputs, ddp, grad_accum=2)) == 2
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err

    # A run killed after step 2 resumes under torchrun to exactly the same losses.
    (ddp / "latest").write_text("checkpoint-2")
    torchrun(argv(inputs, ddp, grad_accum=2))
    assert curve(records(ddp)) == curve(ours)
