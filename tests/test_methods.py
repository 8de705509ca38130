"""The method registry and `lorakit sft --method bottleneck | ia3 | prefix` end to end."""

import json

import pytest
import torch
import transformers

from adapter_models import llama, logits
from lorakit import load_adapter
from lorakit.cli import main
from lorakit.peft.methods import METHODS, apply_method
from lorakit.recipes.common import RunConfig
from sft_helpers import qa_rows, saved_model


def test_every_registered_method_applies_to_a_llama() -> None:
    totals = {}
    for method in METHODS:
        report = apply_method(llama(), method, RunConfig())
        assert 0 < report.trainable <= report.total
        totals[method] = report.trainable / report.total
    assert totals["full"] == 1.0
    assert max(share for method, share in totals.items() if method != "full") < 0.5
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        apply_method(llama(), "dora", RunConfig())


def test_sft_with_bottleneck_adapters_saves_a_loadable_adapter(tmp_path, capsys) -> None:
    model_dir = saved_model(tmp_path / "tiny")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(12)))
    out = tmp_path / "out"
    argv = ["sft", "--model", str(model_dir), "--data", str(data), "--method", "bottleneck"]
    argv += ["--bottleneck-size", "4", "--bottleneck-placement", "mlp", "--out", str(out)]
    assert (
        main([*argv, "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--no-progress"]) == 0
    )
    assert f"saved {out / 'adapter'}" in capsys.readouterr().out
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["size"], config["placement"]) == (
        "LORAKIT_BOTTLENECK",
        4,
        "mlp",
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    before = logits(base, torch.tensor([[1, 2, 3]]))
    assert load_adapter(base, out / "adapter") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert not torch.equal(logits(base, torch.tensor([[1, 2, 3]])), before)  # it trained


@pytest.mark.parametrize(
    ("method", "options", "peft_type", "loaded"),
    [
        (
            "ia3",
            [],  # PEFT's defaults for llama
            "IA3",
            [
                f"model.layers.{i}.{m}"
                for i in range(2)
                for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
            ],
        ),
        ("prefix", ["--prefix-num-virtual-tokens", "4"], "PREFIX_TUNING", ["lorakit_prefix"]),
    ],
)
def test_sft_with_ia3_or_prefix_saves_a_loadable_peft_adapter(
    tmp_path, capsys, method, options, peft_type, loaded
) -> None:
    model_dir = saved_model(tmp_path / "tiny")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(12)))
    out = tmp_path / "out"
    argv = ["sft", "--model", str(model_dir), "--data", str(data), "--method", method, *options]
    argv += ["--out", str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "3e-2"]
    assert main([*argv, "--no-progress"]) == 0
    assert f"saved {out / 'adapter'}" in capsys.readouterr().out
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    assert config["base_model_name_or_path"] == str(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 2, 3]])
    before = logits(base, ids)
    assert load_adapter(base, out / "adapter") == sorted(loaded)
    assert not torch.equal(logits(base, ids), before)  # it trained
