"""`lorakit sft --method qlora --fsdp` under torchrun: 2 CPU processes (gloo) with the NF4 base
sharded train as one process with twice the gradient accumulation; every rank writes its part of
each checkpoint, a resumed run repeats the same losses, and the adapter of a 2-rank checkpoint
loads into one process; `lorakit reward` and `lorakit dpo` likewise train as one process."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_files import write_jsonl
from lorakit.models import ModelConfig, load_model
from lorakit.peft import LoraConfig
from lorakit.peft.inject import apply_lora
from lorakit.train import sharded_checkpoint
from preference_helpers import pair_rows
from sft_helpers import saved_model
from test_trainer_ddp import (
    assert_same_metrics,
    curve,
    records,
    run_single_threaded,
    torchrun,
    varied_rows,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(20)))
    return saved_model(root / "model"), data


def argv(inputs: tuple[Path, Path], out: Path, grad_accum: int, *extra: str) -> list[str]:
    model, data = inputs
    return [
        "sft", "--model", str(model), "--data", str(data), "--method", "qlora", "--out", str(out),
        "--lora-r", "4", "--dedup", "none", "--no-pack", "--val-fraction", "0.2",
        "--batch-size", "2", "--grad-accum", str(grad_accum), "--max-steps", "4",
        "--save-every", "2", "--eval-every", "2", "--lr", "1e-2", "--no-progress", *extra,
    ]  # fmt: skip


def test_fsdp_trains_as_one_process_and_resumes(inputs, tmp_path) -> None:
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    torchrun(argv(inputs, sharded, 2, "--fsdp"))
    run_single_threaded(argv(inputs, single, 4))

    # The same rows per step and the same token-weighted mean; FSDP all-gathers the same NF4
    # bytes and reduce-scatters the gradients in another order than one process accumulates
    # them (float32 rounding, ~1e-7 relative), which four Adam steps carry into the losses at
    # about that size.
    ours, theirs = records(sharded), records(single)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    assert_same_metrics(ours, theirs, ["loss", "val_loss", "grad_norm"], rel=1e-5)
    adapters = [
        load_file(out / "adapter" / "adapter_model.safetensors") for out in (sharded, single)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        torch.testing.assert_close(value, adapters[1][key], rtol=1e-4, atol=1e-5)

    # Every rank wrote its own file of the checkpoint, and its own optimizer state.
    last = sharded / "checkpoint-4"
    assert len(list((last / "sharded").glob("*.safetensors"))) == 2
    assert (last / "optimizer-rank0.json").exists() and (last / "optimizer-rank1.json").exists()
    assert not (last / "trainable.safetensors").exists()

    # The adapter of the 2-rank checkpoint loads into one process, whole: it is the adapter
    # that rank 0 saved at the end (the same step).
    model = load_model_with_adapter(inputs[0])
    sharded_checkpoint.load_trainable(last, model)
    params = dict(model.named_parameters())
    for key, value in adapters[0].items():
        name = key.removeprefix("base_model.model.").removesuffix(".weight") + ".default"
        torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=0, msg=key)

    # A run killed after step 2 resumes under torchrun to exactly the same losses, also with
    # gradient checkpointing (it recomputes the same activations; the layers' all-gathers are
    # then repeated in the backward pass).
    (sharded / "latest").write_text("checkpoint-2")
    torchrun(argv(inputs, sharded, 2, "--fsdp", "--gradient-checkpointing"))
    assert curve(records(sharded)) == curve(ours)


@pytest.mark.parametrize("recipe", ["reward", "dpo"])
def test_preference_recipes_train_sharded_as_one_process(tmp_path, recipe) -> None:
    model = saved_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))

    def pair_argv(out: Path, grad_accum: int, *extra: str) -> list[str]:
        return [
            recipe, "--model", str(model), "--data", str(data), "--method", "qlora",
            "--out", str(out), "--lora-r", "4", "--dedup", "none", "--val-fraction", "0.25",
            "--batch-size", "2", "--grad-accum", str(grad_accum), "--max-steps", "3",
            "--eval-every", "3", "--lr", "1e-2", "--no-progress", *extra,
        ]  # fmt: skip

    torchrun(pair_argv(tmp_path / "fsdp", 1, "--fsdp"))
    run_single_threaded(pair_argv(tmp_path / "single", 2))
    ours, theirs = records(tmp_path / "fsdp"), records(tmp_path / "single")
    metric = "accuracy" if recipe == "reward" else "reward_margin"
    # The ranks' gradients reduce-scattered in another order: float32 rounding carried by Adam
    # (the same bound as the DDP test of these recipes).
    keys = ["loss", "val_loss", "grad_norm", metric, f"val_{metric}"]
    assert_same_metrics(ours, theirs, keys, rel=1e-4, abs=1e-6)


def load_model_with_adapter(path: Path) -> torch.nn.Module:
    model = load_model(ModelConfig(model=str(path)))
    apply_lora(model, LoraConfig(r=4, quantize="nf4"))
    return model
