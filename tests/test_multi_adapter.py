"""Several named adapters on one base: switching, disabling, and that no base weight is copied."""

import copy

import pytest
import torch

from adapter_models import llama, logits, randomize_adapters
from lorakit import (
    LoraConfig,
    apply_lora,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from lorakit.peft import active_adapter, adapter_names, lora_layers


def base_storages(model: torch.nn.Module) -> dict[str, int]:
    return {
        n: p.untyped_storage().data_ptr() for n, p in model.named_parameters() if ".lora_" not in n
    }


@pytest.fixture
def two_adapters(tmp_path):
    """A base, the same base with adapter "a" (q, v) and one with adapter "b" (all linear)."""
    base = llama()
    single = {}
    for name, config in {
        "a": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": LoraConfig(r=8, alpha=8, use_rslora=True),
    }.items():
        model = copy.deepcopy(base)
        apply_lora(model, config)
        randomize_adapters(model)
        save_adapter(model, tmp_path / name)
        single[name] = model
    both = copy.deepcopy(base)
    load_adapter(both, tmp_path / "a", name="a")
    load_adapter(both, tmp_path / "b", name="b")
    return base, single, both


def test_set_adapter_switches_and_disable_gives_the_base(two_adapters):
    base, single, both = two_adapters
    ids = torch.randint(0, 128, (2, 10))
    assert adapter_names(both) == ["a", "b"]
    assert active_adapter(both) == "a"  # the first loaded stays active
    storages = base_storages(both)
    # Exact: each layer runs the same op on the same tensors as the single-adapter model.
    torch.testing.assert_close(logits(both, ids), logits(single["a"], ids), rtol=0, atol=0)
    set_adapter(both, "b")
    torch.testing.assert_close(logits(both, ids), logits(single["b"], ids), rtol=0, atol=0)
    with disable_adapters(both) as same:
        assert same is both
        torch.testing.assert_close(logits(both, ids), logits(base, ids), rtol=1e-6, atol=1e-6)
    assert active_adapter(both) == "b"
    torch.testing.assert_close(logits(both, ids), logits(single["b"], ids), rtol=0, atol=0)
    set_adapter(both, "a")
    torch.testing.assert_close(logits(both, ids), logits(single["a"], ids), rtol=0, atol=0)
    assert base_storages(both) == storages  # switching never copied a base weight


def test_disable_restores_even_after_an_error(two_adapters):
    _, _, both = two_adapters
    with pytest.raises(RuntimeError, match="inside"), disable_adapters(both):
        assert not any(layer.adapters_enabled for _, layer in lora_layers(both))
        raise RuntimeError("inside")
    assert all(layer.adapters_enabled for _, layer in lora_layers(both))


def test_disabled_model_is_a_reference_without_gradients_to_the_adapter():
    model = llama()
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_adapters(model)
    ids = torch.randint(0, 128, (1, 8))
    with disable_adapters(model):
        reference = model(input_ids=ids, labels=ids).loss
    assert not reference.requires_grad  # the frozen base alone: nothing to train through
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_adapter_name_is_a_clear_error(two_adapters):
    _, _, both = two_adapters
    with pytest.raises(KeyError, match=r"no adapter named 'c'; the model has \['a', 'b'\]"):
        set_adapter(both, "c")
    assert active_adapter(both) == "a"


def test_apply_lora_adds_a_second_trainable_adapter():
    model = llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    report = apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "k_proj"]), "b")
    assert active_adapter(model) == "b"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    assert report.trainable == 2 * (2 * (64 + 64) + 2 * (64 + 32))
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'b'"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"]), "b")
