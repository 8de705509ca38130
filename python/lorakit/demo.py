"""The README's first command (until the SFT demo lands): NF4-quantize a small Llama built from a
transformers config, and report its memory before and after and what quantization costs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lorakit.quant import NF4Weight


@dataclass(frozen=True)
class DemoConfig:
    hidden: int = 1024
    layers: int = 8
    vocab: int = 32000
    blocksize: int = 64
    double_quant: bool = True
    seed: int = 0


@dataclass(frozen=True)
class DemoReport:
    linear_params: int
    linear_bytes_before: int
    linear_bytes_after: int
    model_bytes_before: int
    model_bytes_after: int
    relative_output_error: float
    seconds: float

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.linear_bytes_after / self.linear_params


def build_llama(config: DemoConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        hidden_size=config.hidden,
        intermediate_size=config.hidden * 11 // 4,
        num_hidden_layers=config.layers,
        num_attention_heads=max(1, config.hidden // 64),
        num_key_value_heads=max(1, config.hidden // 256),
        vocab_size=config.vocab,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(model_config).to(torch.bfloat16).eval()


def run(config: DemoConfig, progress: bool = True) -> DemoReport:
    model = build_llama(config)
    # The decoder's linear layers are what QLoRA quantizes; embeddings and the LM head stay.
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }
    model_bytes = sum(p.nbytes for p in model.parameters())
    before = sum(m.weight.nbytes for m in linears.values())
    start = time.perf_counter()
    quantized: dict[str, NF4Weight] = {}
    for name, layer in tqdm(linears.items(), desc="NF4-quantizing", disable=not progress):
        quantized[name] = NF4Weight.from_float(
            layer.weight.detach(), config.blocksize, config.double_quant
        )
    seconds = time.perf_counter() - start
    after = sum(w.nbytes for w in quantized.values())

    name, layer = next(iter(linears.items()))
    x = torch.randn(16, layer.in_features, dtype=torch.bfloat16)
    exact = layer(x).float()
    approx = torch.nn.functional.linear(x, quantized[name].dequantize()).float()
    error = ((approx - exact).norm() / exact.norm()).item()
    return DemoReport(
        linear_params=sum(m.weight.numel() for m in linears.values()),
        linear_bytes_before=before,
        linear_bytes_after=after,
        model_bytes_before=model_bytes,
        model_bytes_after=model_bytes - before + after,
        relative_output_error=error,
        seconds=seconds,
    )


def format_report(config: DemoConfig, report: DemoReport) -> str:
    mib = 1 / 2**20
    return "\n".join(
        [
            f"Llama-style model: hidden {config.hidden}, {config.layers} layers, bf16",
            f"decoder linear weights: {report.linear_params / 1e6:.1f}M parameters",
            f"  before: {report.linear_bytes_before * mib:8.1f} MiB (bf16, 16 bits/parameter)",
            f"  after:  {report.linear_bytes_after * mib:8.1f} MiB "
            f"(NF4, {report.bits_per_parameter:.3f} bits/parameter"
            f"{', double-quantized scales' if config.double_quant else ''})",
            f"whole model: {report.model_bytes_before * mib:.1f} MiB -> "
            f"{report.model_bytes_after * mib:.1f} MiB "
            f"({report.model_bytes_before / report.model_bytes_after:.2f}x smaller)",
            f"quantized in {report.seconds:.2f} s; relative error of one layer's output: "
            f"{report.relative_output_error:.3f}",
        ]
    )
