"""IA3 against PEFT's (IA)³: outputs, parameter counts, files both ways, training, merge, errors."""

import copy
import json

import peft
import pytest
import safetensors.torch
import torch
import transformers
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FEEDFORWARD,
)
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
)
from torch.nn import functional as F

from adapter_models import (
    assert_logits_close,
    assert_unchanged,
    llama,
    logits,
    snapshot,
    tiny,
    train,
)
from lorakit import (
    IA3Config,
    LoraConfig,
    apply_ia3,
    apply_lora,
    disable_adapters,
    load_adapter,
    merge_adapter,
    merge_and_export,
    save_adapter,
    unmerge_adapter,
)
from lorakit.nn import IA3Linear, NF4Linear
from lorakit.peft.ia3 import IA3_DEFAULTS

ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt2"]


def peft_ia3(base: torch.nn.Module) -> peft.PeftModel:
    """PEFT's IA3 with its defaults on a copy of ``base``, vectors drawn around 1 so they count."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ia3_l." in name:
                parameter.normal_(mean=1.0, std=0.3)
    return model.eval()


def copy_vectors(theirs: peft.PeftModel, ours: torch.nn.Module) -> int:
    """Copies PEFT's ia3_l into the same layers of ``ours``; returns how many were copied."""
    copied = 0
    for name, parameter in theirs.named_parameters():
        if ".ia3_l." in name:
            module = name.removeprefix("base_model.model.").partition(".ia3_l.")[0]
            layer = ours.get_submodule(module)
            assert isinstance(layer, IA3Linear)
            with torch.no_grad():
                layer.ia3_l["default"].copy_(parameter)
            copied += 1
    return copied


def test_defaults_are_peft_defaults():
    for model_type, (targets, feedforward) in IA3_DEFAULTS.items():
        assert targets == PEFT_TARGETS[model_type], model_type
        assert feedforward == PEFT_FEEDFORWARD[model_type], model_type


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_logits_and_parameter_count_as_peft(arch):
    base = tiny(arch)
    theirs = peft_ia3(base)
    ours = copy.deepcopy(base)
    report = apply_ia3(ours, IA3Config())
    # k, v and down_proj of two layers; GPT-2's fused c_attn and mlp.c_proj
    assert copy_vectors(theirs, ours) == len(report.replaced) == (4 if arch == "gpt2" else 6)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
    # Each layer scaled the way PEFT scales it: the feed-forward layers on their input.
    for name in report.replaced:
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert ours.get_submodule(name).settings["default"].feedforward == peft_layer.is_feedforward
    ids = torch.randint(0, 128, (2, 12))
    assert_logits_close(logits(ours, ids), logits(theirs, ids))
    with disable_adapters(ours):
        assert_logits_close(logits(ours, ids), logits(base, ids))


def test_nf4_base_scales_the_dequantized_layer():
    model = llama()
    apply_ia3(model, IA3Config(quantize="nf4"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        assert isinstance(layer.base, NF4Linear)
        with torch.no_grad():
            layer.ia3_l["default"].normal_(mean=1.0, std=0.3)
        weight = layer.base.weight.dequantize(torch.float32)
        scale = layer.ia3_l["default"].detach().flatten()
        inputs = torch.randn(3, 5, layer.in_features)
        if layer.settings["default"].feedforward:
            expected = F.linear(inputs * scale, weight)
        else:
            expected = F.linear(inputs, weight) * scale
        # The NF4 kernel and F.linear on the expanded weight sum in other orders (float32).
        assert_logits_close(layer(inputs), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_adapter_loads_in_peft_and_peft_files_load_in_lorakit(tmp_path, arch):
    base = tiny(arch)
    theirs = peft_ia3(base)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    loaded = load_adapter(ours, tmp_path / "peft")
    assert len(loaded) == (4 if arch == "gpt2" else 6)
    ids = torch.randint(0, 128, (2, 10))
    assert_logits_close(logits(ours, ids), logits(theirs, ids))

    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_logits_close(logits(again, ids), logits(ours, ids))
    # The same keys, shapes and meaning of the config as PEFT's own save.
    mine = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    reference = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type"):
        assert config[key] == their_config[key]
    for layer in again.base_model.model.modules():
        if isinstance(layer, peft.tuners.ia3.IA3Layer):
            assert tuple(layer.ia3_l["default"].shape) == (
                (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
            )


def test_trains_like_peft_and_the_loss_goes_down():
    base = llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM"))
    ours = copy.deepcopy(base)
    apply_ia3(ours, IA3Config())
    ids = torch.randint(0, 128, (4, 16))
    # Both start at ones: the same AdamW steps must follow the same path.
    expected = train(theirs.train(), ids, steps=25, lr=0.1)
    losses = train(ours.train(), ids, steps=25, lr=0.1)
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=0)
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


def test_qlora_style_ia3_trains():
    model = llama()
    apply_ia3(model, IA3Config(quantize="nf4"))
    ids = torch.randint(0, 128, (4, 16))
    losses = train(model.train(), ids, steps=25, lr=0.1)
    assert losses[-1] < losses[0] - 0.1


def test_merge_unmerge_and_export(tmp_path):
    base = llama()
    theirs = peft_ia3(base)
    ours = copy.deepcopy(base)
    apply_ia3(ours, IA3Config())
    copy_vectors(theirs, ours)
    ids = torch.randint(0, 128, (2, 10))
    adapted = logits(ours, ids)
    k_proj = ours.get_submodule("model.layers.0.self_attn.k_proj")
    before = k_proj.base.weight.detach().clone()
    assert merge_adapter(ours) == 6
    assert not torch.equal(k_proj.base.weight, before)
    assert_logits_close(logits(ours, ids), adapted)
    # PEFT's merge gives the same weights (rows scaled for k/v, columns for down_proj).
    theirs.merge_adapter()
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        expected = theirs.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(ours.get_submodule(name).base.weight, expected)
    assert unmerge_adapter(ours) == 6
    # Division by l undoes the product to a float32 rounding or two.
    torch.testing.assert_close(k_proj.base.weight, before, rtol=1e-6, atol=1e-7)
    out = merge_and_export(ours, tmp_path / "merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_logits_close(logits(exported, ids), adapted)


@pytest.fixture
def saved(tmp_path):
    model = llama()
    apply_ia3(model, IA3Config())
    return save_adapter(model, tmp_path / "ia3")


def rewrite(folder, change) -> None:
    path = folder / "adapter_model.safetensors"
    safetensors.torch.save_file(change(safetensors.torch.load_file(path)), path)


def widen(tensors):
    key = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    tensors[key] = torch.ones(1, 129)
    return tensors


def rename(tensors):
    key = next(k for k in tensors if "layers.1.self_attn.k_proj" in k)
    tensors[key.replace("k_proj", "x_proj")] = tensors.pop(key)
    return tensors


def set_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: rewrite(d, widen), r"ia3_l \[1, 129\] does not fit a feed-forward"),
        (lambda d: rewrite(d, rename), "'model.layers.1.self_attn.x_proj' match no linear layer"),
        # Read as output scalings, the (1, in) down_proj vectors no longer fit.
        (lambda d: set_config(d, feedforward_modules=[]), r"\[1, 128\] does not fit an output"),
        (lambda d: set_config(d, peft_type="ADALORA"), "peft_type 'ADALORA' is not one lorakit"),
        (lambda d: set_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
        (
            lambda d: set_config(d, target_modules=["k_proj", "down_proj"]),
            "ia3: adapter_model.safetensors disagrees with adapter_config.json: it has weights for "
            "model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj, which",
        ),
        (
            lambda d: rewrite(
                d, lambda t: {k: v for k, v in t.items() if ".1.self_attn.k" not in k}
            ),
            "ia3: adapter_model.safetensors disagrees with adapter_config.json: target_modules "
            "names model.layers.1.self_attn.k_proj, which it has no weights for",
        ),
    ],
    ids=[
        "wrong-shape",
        "unknown-module",
        "feedforward-mismatch",
        "other-method",
        "extra-modules",
        "weights-not-targeted",
        "target-without-weights",
    ],
)
def test_bad_files_are_clear_errors_and_leave_the_model_as_it_was(saved, damage, match):
    damage(saved)
    model = llama()
    apply_lora(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj"]), name="other")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def test_bad_configs_are_clear_errors_and_leave_the_model_as_it_was():
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"match no module of LlamaForCausalLM.*'k_proj'"):
        apply_ia3(model, IA3Config(target_modules=["nope"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match=r"which are.*RMSNorm.*not linear layers"):
        apply_ia3(model, IA3Config(target_modules=["input_layernorm"], feedforward_modules=[]))
    assert_unchanged(model, before)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"no default target_modules.*model_type None"):
        apply_ia3(plain, IA3Config())
    report = apply_ia3(plain, IA3Config(target_modules=["0"], feedforward_modules=["0"]))
    assert report.trainable == 8 and plain[0].settings["default"].feedforward


def test_a_layer_holds_one_method_and_names_are_not_reused():
    model = llama()
    apply_lora(model, LoraConfig(target_modules=["k_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['LoRALinear'\], not linear layers"):
        apply_ia3(model, IA3Config())
    assert_unchanged(model, before)
    apply_ia3(model, IA3Config(target_modules=["v_proj"], feedforward_modules=[]), name="ia3")
    with pytest.raises(ValueError, match="already has an IA3 adapter named 'ia3'"):
        apply_ia3(model, IA3Config(target_modules=["v_proj"], feedforward_modules=[]), name="ia3")
