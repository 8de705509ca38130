"""`lorakit reward` and `lorakit dpo` under torchrun: 2 gloo processes train as one process with
twice the gradient accumulation (a pair is never split between ranks or batches)."""

import pytest

from data_files import write_jsonl
from preference_helpers import pair_rows
from sft_helpers import saved_model
from test_trainer_ddp import assert_same_metrics, records, run_single_threaded, torchrun


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
    run_single_threaded(argv(tmp_path / "single", 2))
    ours, theirs = records(tmp_path / "ddp"), records(tmp_path / "single")
    metric = "accuracy" if recipe == "reward" else "reward_margin"
    # The ranks' gradients summed in another order: float32 rounding carried by Adam.
    keys = ["loss", "val_loss", "grad_norm", metric, f"val_{metric}"]
    assert_same_metrics(ours, theirs, keys, rel=1e-4, abs=1e-6)
