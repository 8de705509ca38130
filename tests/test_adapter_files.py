"""save_adapter / load_adapter against PEFT's own files, and every way a load can fail."""

import copy
import json
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
import transformers

import lorakit
from adapter_models import (
    PROJECTIONS,
    SMALL_LLAMA,
    assert_logits_close,
    assert_unchanged,
    llama,
    logits,
    randomize_adapters,
    snapshot,
    train,
)
from lorakit import LoraConfig, apply_lora, load_adapter, save_adapter
from lorakit.nn import LoRALinear
from lorakit.peft.base_record import BASE_NAME, read_base_record


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path, rslora):
    base = llama()
    ours = copy.deepcopy(base)
    apply_lora(ours, LoraConfig(r=8, alpha=16, target_modules=PROJECTIONS, use_rslora=rslora))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 128, (2, 12))
    assert_logits_close(logits(theirs, ids), logits(ours, ids))
    # The same key names and config keys as PEFT's own save of the same adapter.
    reference = tmp_path / "peft"
    theirs.save_pretrained(reference)
    ours_keys = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors").keys()
    assert ours_keys == safetensors.torch.load_file(reference / "adapter_model.safetensors").keys()
    ours_config = json.loads((tmp_path / "adapter_config.json").read_text())
    their_config = json.loads((reference / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "task_type", "bias"):
        assert ours_config[key] == their_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(their_config["target_modules"])


def test_adapter_trained_and_saved_by_peft_loads_with_the_same_logits(tmp_path):
    base = llama()
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 4},  # per-layer overrides must be honoured too
        alpha_pattern={"v_proj": 40},
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ids = torch.randint(0, 128, (2, 12))
    train(theirs, ids, steps=5)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    loaded = load_adapter(ours, tmp_path)
    assert len(loaded) == 6
    layer = ours.get_submodule("model.layers.0.self_attn.v_proj")
    assert layer.settings["default"].alpha == 40
    assert ours.get_submodule("model.layers.1.mlp.down_proj").settings["default"].r == 4
    assert not any(p.requires_grad for p in ours.parameters())  # trainable=False by default
    theirs.eval()
    assert_logits_close(logits(ours, ids), logits(theirs, ids))


@pytest.mark.parametrize(
    "options",
    [
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "modules_to_save": ["lm_head"]},
        {
            "target_modules": r"model\.layers\.1\.(self_attn|mlp)\.\w+_proj|lm_head",
            "modules_to_save": ["lm_head"],  # trained whole, so PEFT puts no LoRA on it
        },
        {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
    ],
    ids=["list", "regex", "all-linear"],
)
def test_peft_saved_target_modules_of_each_kind_load_with_the_same_logits(tmp_path, options):
    """PEFT's matching (suffixes, re.fullmatch, all-linear less exclude_modules, no adapter on
    modules_to_save) picks what its files hold: the target check must accept them all."""
    base = llama()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **options)
    )
    ids = torch.randint(0, 128, (2, 12))
    train(theirs, ids, steps=3)  # moves B off zero and, for modules_to_save, lm_head
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    loaded = load_adapter(ours, tmp_path)
    wrapped = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert set(loaded) == wrapped
    theirs.eval()
    assert_logits_close(logits(ours, ids), logits(theirs, ids))


def test_a_sequence_classifier_adapter_saved_by_peft_loads_with_the_same_scores(tmp_path):
    # PEFT's SEQ_CLS task lists modules_to_save ["classifier", "score"] whatever the model has;
    # a Llama classifier has only "score", and PEFT skips the other name.
    config = transformers.LlamaConfig(**SMALL_LLAMA, num_labels=1, pad_token_id=0)
    base = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, task_type="SEQ_CLS", target_modules=PROJECTIONS)
    )
    assert set(theirs.peft_config["default"].modules_to_save) == {"classifier", "score"}
    with torch.no_grad():  # B off zero and a head other than the base's
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    ids = torch.randint(1, 128, (2, 12))
    theirs.eval()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-6)
    assert (logits(ours, ids) - logits(base, ids)).abs().max() > 1e-3
    # On a causal LM its score head has no place: skipped as a name, refused as weights.
    with pytest.raises(ValueError, match="'score' matches no module of LlamaForCausalLM, but"):
        load_adapter(llama(), tmp_path)


def test_round_trip_through_lorakit_files(tmp_path):
    base = llama()
    ours = copy.deepcopy(base)
    apply_lora(ours, LoraConfig(r=4, alpha=8))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path)
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path, trainable=True)
    ids = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=0, atol=0)
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ours.named_parameters() if p.requires_grad}


@pytest.fixture
def saved(tmp_path) -> Path:
    model = llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / "adapter")


def rewrite_tensors(folder: Path, change) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(change(tensors), path)


def rename_one(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_A" in k)
    tensors[key.replace("v_proj", "v_proj_x")] = tensors.pop(key)
    tensors[key.replace("v_proj", "v_proj_x").replace("lora_A", "lora_B")] = tensors.pop(
        key.replace("lora_A", "lora_B")
    )
    return tensors


def set_targets(folder: Path, targets: list[str] | str | None) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"target_modules": targets}))


def widen_one(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    return tensors


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, "does not exist"),
        (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "does not exist"),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00" + b"x" * 40),
            ValueError,
            "is not a readable safetensors file",
        ),
        (
            lambda d: rewrite_tensors(d, rename_one),
            ValueError,
            "'model.layers.1.self_attn.v_proj_x'",
        ),
        (lambda d: rewrite_tensors(d, widen_one), ValueError, r"lora_B \[33, 4\] do not fit"),
        (
            lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,'),
            ValueError,
            "is not valid JSON",
        ),
        (
            lambda d: (d / "adapter_config.json").write_text(
                json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
            ),
            ValueError,
            "use_dora=True is not supported",
        ),
        (lambda d: set_targets(d, None), ValueError, "target_modules is missing"),
    ],
    ids=[
        "no-weights",
        "no-config",
        "corrupt",
        "unknown-module",
        "wrong-shape",
        "bad-json",
        "dora",
        "no-targets",
    ],
)
def test_bad_adapter_files_are_clear_errors_and_leave_the_model_as_it_was(
    saved, damage, error, match
):
    damage(saved)
    model = llama()
    apply_lora(model, LoraConfig(r=2, alpha=2, target_modules=["k_proj"]), name="other")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def drop_one(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj" not in k}


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (
            lambda d: set_targets(d, ["q_proj"]),
            "it has weights for model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj, "
            "which target_modules does not name",
        ),
        (
            lambda d: set_targets(d, r".*\.q_proj"),
            "it has weights for model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj, "
            "which target_modules does not name",
        ),
        (
            lambda d: rewrite_tensors(d, drop_one),
            "target_modules names model.layers.1.self_attn.v_proj, which it has no weights for",
        ),
        (
            lambda d: set_targets(d, "all-linear"),
            "target_modules names model.layers.0.mlp.down_proj, model.layers.0.mlp.gate_proj, "
            "model.layers.0.mlp.up_proj and 7 more, which it has no weights for",
        ),
    ],
    ids=["unnamed-weights", "unnamed-by-regex", "missing-weights", "missing-by-all-linear"],
)
def test_weights_that_disagree_with_target_modules_are_refused(saved, damage, says):
    """PEFT would drop weights that target_modules do not pick, and leave picked layers without
    weights at their initial values: a model other than the one trained."""
    damage(saved)
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError) as refused:
        load_adapter(model, saved)
    message = str(refused.value)
    assert message.startswith(f"{saved}: adapter_model.safetensors disagrees with ")
    assert says in message and "\n" not in message
    assert_unchanged(model, before)


def test_pickle_files_are_never_loaded(saved):
    path = saved / "adapter_model.safetensors"
    path.rename(saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load_adapter(llama(), saved)


def test_loading_a_name_twice_is_refused_without_change(saved):
    model = llama()
    load_adapter(model, saved)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'default'"):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def test_writes_are_atomic(saved, monkeypatch):
    """A write that dies half way leaves the previous file whole and no temporary file behind."""
    path = saved / "adapter_model.safetensors"
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    model = llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, saved)
    assert path.read_bytes() == before
    assert sorted(p.name for p in saved.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit_base.json",
    ]


def test_the_base_record_says_how_the_base_was_held(tmp_path):
    # lorakit grpo / ppo --init-adapter follow it (tests/test_grpo.py).
    qlora = llama()
    apply_lora(qlora, LoraConfig(r=4, quantize="nf4", blocksize=32, double_quant=False))
    record = json.loads((save_adapter(qlora, tmp_path) / BASE_NAME).read_text())
    assert record == {"quantize": "nf4", "blocksize": 32, "double_quant": False}
    assert read_base_record(tmp_path) == record
    dense = llama()
    apply_lora(dense, LoraConfig(r=4))
    assert read_base_record(save_adapter(dense, tmp_path)) == {"quantize": None}
    ia3 = llama()
    lorakit.apply_ia3(ia3, lorakit.IA3Config())
    save_adapter(ia3, tmp_path)  # another method into the same folder: no record left over
    assert not (tmp_path / BASE_NAME).exists()
    (tmp_path / BASE_NAME).write_text('{"quantize": "nf4"}')
    with pytest.raises(ValueError, match="is not a base record lorakit wrote"):
        read_base_record(tmp_path)


def test_a_model_without_adapters_has_nothing_to_save(tmp_path):
    with pytest.raises(ValueError, match="the model has no adapter to save"):
        save_adapter(llama(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_names_a_missing_adapter():
    model = llama()
    apply_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no LoRA layer holds an adapter named 'x'"):
        save_adapter(model, "/nonexistent/never-written", name="x")
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), LoRALinear)
    assert lorakit.peft.adapter_names(model) == ["default"]


def test_another_method_plugs_in_with_one_format_entry(tmp_path, monkeypatch):
    """A method with its own format (peft_type of its own) needs one entry in FORMATS."""
    calls = []

    def save(model, out, name):
        calls.append(("save", name))
        (out / "adapter_config.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORAKIT_TOY"}))

    def load(model, folder, config, name, trainable):
        calls.append(("load", name, config["peft_type"]))
        return []

    class Toy(lorakit.nn.AdapterLayer):
        method = "toy"

    monkeypatch.setitem(
        lorakit.peft.adapter_io.FORMATS, "LORAKIT_TOY", lorakit.peft.AdapterFormat(Toy, save, load)
    )
    model = llama()
    toy = Toy("t")
    toy.settings["t"] = None
    model.add_module("toy", toy)
    save_adapter(model, tmp_path, name="t")
    load_adapter(llama(), tmp_path, name="u")
    assert calls == [("save", "t"), ("load", "u", "LORAKIT_TOY")]


def test_an_adapter_name_that_spans_two_methods_is_not_saved_as_one(tmp_path):
    model = llama()
    apply_lora(model, LoraConfig(target_modules=["q_proj"]))
    lorakit.apply_ia3(model, lorakit.IA3Config())
    with pytest.raises(ValueError, match=r"spans several methods \(LoRA, IA3\)"):
        save_adapter(model, tmp_path)
    assert not tmp_path.joinpath("adapter_config.json").exists()
