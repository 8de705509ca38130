"""`lorakit sft` / `lorakit pretrain`: every method end to end on a tiny saved model, YAML
configs, and one-line errors for user mistakes."""

import json

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from adapter_models import assert_logits_close, logits
from lorakit.cli import main
from lorakit.data import DataConfig
from lorakit.models import ModelConfig
from lorakit.peft import LoraConfig
from lorakit.recipes.common import RunConfig
from lorakit.recipes.sft import run
from lorakit.train import TrainConfig
from sft_helpers import qa_rows, saved_model, tokenizer

FAST = ["--max-steps", "3", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model") / "tiny")


def data_file(tmp_path, rows=None, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows or qa_rows(12)))
    return str(path)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sft_with_adapters_saves_only_the_adapter(tmp_path, model_dir, method, capsys) -> None:
    out = tmp_path / "out"
    argv = ["sft", "--model", str(model_dir), "--data", data_file(tmp_path), "--method", method]
    assert main([*argv, "--out", str(out), "--lora-r", "4", *FAST]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(model_dir)
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not list(out.glob("*.safetensors"))  # the adapter only, in its directory
    printed = capsys.readouterr().out
    assert "trained 3 steps" in printed and "trainable parameters" in printed
    assert (out / "loss.png").exists() and (out / "metrics.jsonl").exists()


def test_full_sft_saves_a_model_directory(tmp_path, model_dir) -> None:
    out = tmp_path / "out"
    argv = ["sft", "--model", str(model_dir), "--data", data_file(tmp_path), "--method", "full"]
    assert main([*argv, "--out", str(out), *FAST]) == 0
    assert (out / "model" / "config.json").exists()
    assert (out / "model" / "tokenizer.json").exists()


def test_pretrain_trains_on_plain_text(tmp_path, model_dir) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"the capital of one is {w} .\n" for w in ["two", "three", "four"]))
    out = tmp_path / "out"
    argv = ["pretrain", "--model", str(model_dir), "--data", str(text), "--method", "lora"]
    assert main([*argv, "--out", str(out), "--val-fraction", "0", *FAST]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_yaml_config_nested_or_flat_and_the_command_line_wins(tmp_path, model_dir) -> None:
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{model: {model_dir}, method: lora}}\n"
        f"data: [{data_file(tmp_path)}]\n"
        f"train: {{out: {out}, max_steps: 5, batch_size: 4, progress: false}}\n"
        "lora: {r: 2}\n"
    )
    assert main(["sft", "--config", str(config), "--max-steps", "2"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for option in ["--model", "--method", "--data", "--mix", "--seq-len", "--lr", "--lora-r",
                   "--schedule", "--patience", "--config"]:  # fmt: skip
        assert option in text
    assert "qlora: the same with the frozen base in 4-bit NF4" in text


def test_top_level_help_says_what_lorakit_does_and_lists_every_command(capsys) -> None:
    from lorakit.recipes.registry import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Fine-tune language models" in text and "Start with: lorakit demo" in text
    assert all(name in text for name in COMMANDS)


def one_line_error(capsys, argv, expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_user_mistakes_are_one_line_errors(tmp_path, model_dir, capsys) -> None:
    good = ["--model", str(model_dir), "--out", str(tmp_path / "o"), *FAST]
    missing = str(tmp_path / "missing.jsonl")
    one_line_error(capsys, ["sft", *good, "--data", missing], "missing.jsonl does not exist")
    bad_rows = data_file(tmp_path, [*qa_rows(2), {"prompt": "what", "completion": ["two"]}])
    one_line_error(capsys, ["sft", *good, "--data", bad_rows], "row 3: 'completion' must be")
    one_line_error(
        capsys,
        ["sft", "--model", str(tmp_path / "nowhere"), "--data", bad_rows],
        "nowhere does not exist or has no config.json",
    )
    one_line_error(capsys, ["sft", "--data", bad_rows], "missing --model")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rate: 3\n")
    one_line_error(capsys, ["sft", "--config", str(bad_yaml)], "unknown options ['learning_rate']")


def test_an_unknown_method_is_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--model", "m", "--data", "d", "--method", "dora"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'dora'" in err
    assert err.count("\n") == 1 and err.startswith("lorakit sft: error:")  # no usage wall
    assert err.rstrip().endswith("(see lorakit sft --help)")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sft", "--lr", "abc"], "lorakit sft: error: argument --lr: invalid float value: 'abc'"),
        (
            ["reward", "--score", "x.jsonl"],
            "lorakit reward: error: unrecognized arguments: x.jsonl (see lorakit reward --help)",
        ),
        (["nosuch"], "lorakit: error: argument command: invalid choice: 'nosuch'"),
    ],
)
def test_command_line_syntax_errors_are_one_line(capsys, argv, expected) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_peft_loads_the_sft_adapter_with_the_trained_models_logits(tmp_path, model_dir) -> None:
    config = RunConfig(
        model=ModelConfig(model=str(model_dir), method="lora"),
        data=DataConfig(data=[data_file(tmp_path)], val_fraction=0.0),
        train=TrainConfig(out=str(tmp_path / "out"), max_steps=5, batch_size=4, progress=False),
        lora=LoraConfig(r=4, alpha=8),
    )
    trained = run(config)  # what `lorakit sft` runs
    assert trained.saved == tmp_path / "out" / "adapter"

    def base():
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)

    theirs = peft.PeftModel.from_pretrained(base(), trained.saved).eval()
    ids = torch.randint(0, len(tokenizer()), (2, 10))
    assert_logits_close(logits(theirs, ids), logits(trained.model.eval(), ids))
    # Training moved the adapter, so the check compares trained weights, not a zero lora_B.
    assert (logits(theirs, ids) - logits(base(), ids)).abs().max() > 1e-3
