"""Full fine-tuning through the same interface as the adapters."""

import pytest

from adapter_models import llama
from lorakit import LoraConfig, apply_full, apply_lora
from lorakit.peft import count_parameters


def test_every_parameter_trains_and_the_count_is_the_total() -> None:
    model = llama()
    model.requires_grad_(False)  # even a frozen model comes back fully trainable
    report = apply_full(model)
    assert all(p.requires_grad for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert report.trainable == report.total == total
    assert report.replaced == ()
    assert count_parameters(model) == (total, total)
    assert "trainable%: 100.0000" in str(report)


def test_nf4_weights_are_refused() -> None:
    model = llama()
    apply_lora(model, LoraConfig(r=2, quantize="nf4"))
    with pytest.raises(ValueError, match="holds NF4 weights"):
        apply_full(model)
