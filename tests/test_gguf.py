"""GGUF models: ``--model file.gguf`` and ``lorakit convert --gguf`` give the model and tokenizer
the file holds, as plain (savable, trainable) transformers objects."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_files import byte_bpe, smollm2_dir, tiny_model, write_tiny_gguf
from lorakit.cli import main
from lorakit.models import ModelConfig, load_model, load_tokenizer

pytest.importorskip("gguf")
TEXT = "What is the capital of France? Paris, one two."


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    tokenizer = byte_bpe()
    model = tiny_model(tokenizer)
    return write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer, model), tokenizer, model


def _logits(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    with torch.no_grad():
        return model(ids).logits


def test_model_flag_takes_a_gguf_file(tiny, tmp_path) -> None:
    path, tokenizer, source = tiny
    config = ModelConfig(model=str(path), device="cpu")
    model, loaded = load_model(config), load_tokenizer(config)
    assert loaded(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert loaded.eos_token == tokenizer.eos_token and loaded.chat_template
    # Float32 tensors copied as they are into the same architecture: the same logits exactly
    # (a q / k head layout read wrongly would change them entirely).
    torch.testing.assert_close(
        _logits(model, tokenizer), _logits(source, tokenizer), rtol=0, atol=0
    )
    assert not getattr(model, "is_quantized", False)
    assert model.config._name_or_path == str(path)  # what an adapter records as its base
    converted = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(converted) == 1
    assert "quantization_config" not in json.loads((converted[0] / "config.json").read_text())
    # Converted once: the second load reads the cache.
    stamp = (converted[0] / "config.json").stat().st_mtime_ns
    load_model(config)
    assert (converted[0] / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_writes_a_model_directory_transformers_loads(tiny, tmp_path, dtype) -> None:
    path, tokenizer, source = tiny
    out = tmp_path / "out"
    assert main(["convert", "--gguf", str(path), "--out", str(out), "--dtype", dtype]) == 0
    assert any(out.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == getattr(torch, dtype)
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == tokenizer(TEXT).input_ids
    # bfloat16: the source's weights rounded to bf16, so the logits agree to bf16's rounding of
    # weights and activations through 2 layers (a few 1e-2 at these magnitudes).
    tolerance = 0 if dtype == "float32" else 5e-2
    torch.testing.assert_close(
        _logits(model.float(), tokenizer), _logits(source, tokenizer), rtol=0, atol=tolerance
    )


def test_gguf_mistakes_get_one_line(tiny, tmp_path, capsys, monkeypatch) -> None:
    path = tiny[0]
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF not really" * 10)
    out = str(tmp_path / "o")
    cases = [
        (["convert", "--gguf", str(garbage), "--out", out], "cannot read"),
        (["convert", "--gguf", str(tmp_path / "none.gguf"), "--out", out], "does not exist"),
        (["convert", "--gguf", str(tmp_path / "model.bin"), "--out", out], "not a .gguf"),
        (["convert", "--gguf", str(path), "--out", str(path)], "must not be or contain"),
        (["convert", "--gguf", str(path), "--out", str(path.parent), "--overwrite"], "must not be"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert path.stat().st_size > 0  # --overwrite did not take the source for an old output
    with pytest.raises(ValueError, match="cannot read"):
        load_model(ModelConfig(model=str(garbage), device="cpu"))

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="needs the gguf package: pip install gguf"):
        load_tokenizer(ModelConfig(model=str(path)))


@pytest.mark.slow
def test_smollm2_gguf_answers_a_question() -> None:
    """The real SmolLM2-135M-Instruct (Q4_1) converted: it knows the capital of France."""
    config = ModelConfig(model=str(smollm2_dir()), device="cpu")
    model, tokenizer = load_model(config), load_tokenizer(config)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_a_mistake_after_a_conversion_is_one_line_without_progress(tiny, tmp_path, capsys):
    # transformers draws the conversion's bar whatever its progress switch says.
    missing = tmp_path / "missing.jsonl"
    argv = ["sft", "--model", str(tiny[0]), "--data", str(missing), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"lorakit sft: error: data path {missing} does not exist\n"
    assert list((tmp_path / "cache" / "gguf").iterdir())  # it was converted
