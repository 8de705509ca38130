"""`lorakit merge`: a saved LoRA / IA3 adapter merged into a tiny saved Llama gives a plain
Hugging Face model with the adapted model's logits; user mistakes are one line and exit 2."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lorakit
from adapter_models import assert_logits_close, logits, randomize_adapters
from lorakit.cli import main
from sft_helpers import llama, saved_model, tokenizer

IDS = torch.tensor([[1, 5, 7, 2, 9, 11, 3]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return saved_model(tmp_path_factory.mktemp("model") / "tiny")


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def save_lora(base_dir: Path, out: Path, quantize: str | None = None) -> torch.Tensor:
    """A LoRA adapter with random B saved to ``out``; returns the dense adapted model's logits."""
    model = load(base_dir)
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", quantize=quantize)
    lorakit.apply_lora(model, config)
    randomize_adapters(model)
    lorakit.save_adapter(model, out)
    dense = load(base_dir)  # for QLoRA the reference is the dense base with the adapter
    lorakit.load_adapter(dense, out)
    return logits(dense, IDS)


def save_ia3(base_dir: Path, out: Path) -> torch.Tensor:
    model = load(base_dir)
    lorakit.apply_ia3(model, lorakit.IA3Config())
    with torch.no_grad():  # IA3 starts at ones (the identity); move it away
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5)
    lorakit.save_adapter(model, out)
    return logits(model, IDS)


def merge(base_dir: Path, adapter: Path, out: Path, *extra: str) -> int:
    argv = ["merge", "--model", str(base_dir), "--adapter", str(adapter), "--out", str(out)]
    return main([*argv, "--device", "cpu", *extra])


@pytest.mark.parametrize("method", ["lora", "qlora", "ia3"])
def test_merged_model_has_the_adapted_logits(tmp_path, base_dir, method, capsys) -> None:
    adapter = tmp_path / "adapter"
    if method == "ia3":
        expected = save_ia3(base_dir, adapter)
    else:  # QLoRA: the adapter of an NF4 base merges into the dense checkpoint
        expected = save_lora(base_dir, adapter, "nf4" if method == "qlora" else None)
    out = tmp_path / "merged"
    assert merge(base_dir, adapter, out) == 0
    assert f"written to {out}" in capsys.readouterr().out
    assert (out / "tokenizer.json").exists()
    assert not list(out.glob("adapter_*"))
    merged = load(out)
    assert_logits_close(logits(merged, IDS), expected)
    assert not torch.allclose(logits(load(base_dir), IDS), expected, atol=1e-3)


def test_dtype_and_overwrite(tmp_path, base_dir) -> None:
    adapter = tmp_path / "adapter"
    save_lora(base_dir, adapter)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an older model directory: replaced whole
    (out / "model-00002-of-00002.safetensors").write_text("x")
    assert merge(base_dir, adapter, out, "--dtype", "bfloat16", "--overwrite") == 0
    assert not (out / "model-00002-of-00002.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_prefix_adapter_cannot_be_merged(tmp_path, base_dir, capsys) -> None:
    model = load(base_dir)
    lorakit.apply_prefix_tuning(model, lorakit.PrefixTuningConfig(num_virtual_tokens=4))
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert merge(base_dir, tmp_path / "adapter", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be merged" in err and "keys and values" in err
    assert not out.exists()


def _mismatched(tmp_path: Path, base_dir: Path) -> Path:
    """An adapter of a wider model: its shapes do not fit the base."""
    wide = llama(tokenizer(), hidden=64)
    lorakit.apply_lora(wide, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    return lorakit.save_adapter(wide, tmp_path / "wide_adapter")


def _corrupt(tmp_path: Path, base_dir: Path) -> Path:
    save_lora(base_dir, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return tmp_path / "adapter"


def _a_file(tmp_path: Path, base_dir: Path) -> Path:
    save_lora(base_dir, tmp_path / "adapter")
    return tmp_path / "adapter" / "adapter_model.safetensors"


def _targets_q_only(tmp_path: Path, base_dir: Path) -> Path:
    """target_modules name fewer layers than the file holds weights for."""
    save_lora(base_dir, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"target_modules": ["q_proj"]}))
    return tmp_path / "adapter"


def _no_up_proj_weights(tmp_path: Path, base_dir: Path) -> Path:
    """target_modules name a layer that the file holds no weights for."""
    save_lora(base_dir, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    kept = {k: v for k, v in load_file(path).items() if "layers.1.mlp.up_proj" not in k}
    save_file(kept, path)
    return tmp_path / "adapter"


def _no_config(tmp_path: Path, base_dir: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp, base: tmp / "missing", "missing does not exist (an adapter directory holds"),
        (_a_file, "adapter_model.safetensors is a file, not an adapter directory"),
        (_no_config, "adapter_config.json does not exist"),
        (_corrupt, "not a readable safetensors file"),
        (_mismatched, "do not fit"),
        (
            _targets_q_only,
            "adapter: adapter_model.safetensors disagrees with adapter_config.json: it has weights "
            "for model.layers.0.mlp.down_proj",
        ),
        (
            _no_up_proj_weights,
            "adapter: adapter_model.safetensors disagrees with adapter_config.json: "
            "target_modules names model.layers.1.mlp.up_proj, which it has no weights for",
        ),
    ],
)
def test_bad_adapter_is_one_line_and_exit_2(tmp_path, base_dir, make, message, capsys) -> None:
    adapter = make(tmp_path, base_dir)
    out = tmp_path / "merged"
    assert merge(base_dir, adapter, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit merge: error:") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_missing_model_dir_is_exit_2(tmp_path, base_dir, capsys) -> None:
    save_lora(base_dir, tmp_path / "adapter")
    assert merge(tmp_path / "nope", tmp_path / "adapter", tmp_path / "merged") == 2
    assert "model directory" in capsys.readouterr().err


def test_non_empty_out_without_overwrite_writes_nothing(tmp_path, base_dir, capsys) -> None:
    save_lora(base_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert merge(base_dir, tmp_path / "adapter", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


@pytest.mark.parametrize("kind", ["directory of other files", "file", "model plus notes"])
def test_overwrite_never_replaces_what_is_not_a_model_directory(
    tmp_path, base_dir, capsys, kind
) -> None:
    save_lora(base_dir, tmp_path / "adapter")
    out = tmp_path / "mine"
    if kind == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if kind == "model plus notes":
            (out / "config.json").write_text("{}")
    assert merge(base_dir, tmp_path / "adapter", out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose another --out" in err
    kept = out.read_text() if kind == "file" else (out / "notes.txt").read_text()
    assert kept == "mine"


def test_out_may_not_replace_the_base(tmp_path, base_dir, capsys) -> None:
    save_lora(base_dir, tmp_path / "adapter")
    assert merge(base_dir, tmp_path / "adapter", base_dir, "--overwrite") == 2
    assert "must not be" in capsys.readouterr().err
    assert (base_dir / "config.json").exists()
