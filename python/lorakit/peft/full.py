"""Full fine-tuning behind the same interface as the adapters: every parameter trains."""

from __future__ import annotations

from torch import nn

from lorakit.nn import NF4Linear
from lorakit.peft.inject import AdapterReport, count_parameters


def apply_full(model: nn.Module) -> AdapterReport:
    """Makes every parameter of ``model`` trainable, in place; nothing is added or replaced.

    Returns:
        The same report as :func:`lorakit.apply_lora`, with no replaced layer and
        ``trainable == total``.

    Raises:
        ValueError: the model holds NF4 weights, which cannot train (use QLoRA, or a dense model).
    """
    quantized = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    if quantized:
        raise ValueError(f"{quantized[0]} holds NF4 weights, which full fine-tuning cannot train")
    model.requires_grad_(True)
    trainable, total = count_parameters(model)
    return AdapterReport(replaced=(), trainable=trainable, total=total)
