"""`lorakit reward` and `lorakit dpo` under torchrun: 2 gloo processes train as one process with
twice the gradient accumulation (a pair is never split between ranks or batches)."""

import pytest
import torch

from data_files import write_jsonl
from lorakit.cli import main
from preference_helpers import pair_rows
from sft_helpers import saved_model
from test_trainer_ddp import records, torchrun


@pytest.mark.parametrize("recipe", ["reward", "dpo"])
def test_two_processes_train_as_one_with_twice_the_accumulation(tmp_path, recipe) -> None:
    model = saved_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))

    def argv(out, grad_accum: int) -> list[str]:
        return [
            recipe, "--model", str(model), "--data", str(data), "--method", "lora",
            "--out", str(out), "--lora-r", "4", "--dedup", "none", "--val-fraction", "0.25",
            "--batch-size", "2", "--grad-accum", str(grad_accum), "--max-steps", "3",
            "--eval-every", "3", "--lr", "1e-2", "--no-progress",
        ]  # fmt: skip

    torchrun(argv(tmp_path / "ddp", 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv(tmp_path / "single", 2)) == 0
    finally:
        torch.set_num_threads(threads)
    ours, theirs = records(tmp_path / "ddp"), records(tmp_path / "single")
    metric = "accuracy" if recipe == "reward" else "reward_margin"
    for key in ("loss", "val_loss", "grad_norm", metric, f"val_{metric}"):
        got = [r[key] for r in ours if key in r]
        expected = [r[key] for r in theirs if key in r]
        assert len(got) == len(expected) > 0, key
        # The ranks' gradients summed in another order: float32 rounding carried by Adam.
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), key
