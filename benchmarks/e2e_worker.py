"""One measurement of ``bench_e2e.py`` in a process of its own (its memory peak is its own).

Run as ``python benchmarks/e2e_worker.py SPEC.json RESULT.json``. The spec names the model
shape (``SHAPES``), the library (``lorakit``: lorakit's QLoRA layers and ``Trainer``;
``peft_bnb``: PEFT LoRA over bitsandbytes ``Linear4bit``, a plain transformers training loop;
``dense``: the bf16 model without adapters, decode only), the task (``train`` or ``decode``)
and the sizes.

The model is a Llama of the named shape with random weights, never downloaded: it is created on
the meta device and materialised one decoder layer at a time, each layer's linear weights going
straight into 4-bit NF4 (double-quantized scales, blocks of 64) before the next layer exists, so
the whole model never exists in 16 bits. QLoRA: rank 16, alpha 32, every linear layer of the
decoder, no dropout; the embeddings, norms and output head stay in the compute dtype, frozen.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from preference_worker import Peak, StepClock, step_stats

LORA_R = 16
LORA_ALPHA = 32
INIT_STD = 0.02  # Llama's initializer_range

# Llama-3 shapes (8B, 70B) and a CPU-sized one with the same proportions of heads to KV heads.
SHAPES: dict[str, dict[str, int]] = {
    "cpu": {
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 32_000,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14_336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128_256,
    },
    "70b": {
        "hidden_size": 8192,
        "intermediate_size": 28_672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128_256,
    },
}


def llama_config(shape: str, dtype: torch.dtype) -> LlamaConfig:
    return LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
        dtype=dtype,
    )


def _fill_(module: nn.Module, generator: torch.Generator) -> None:
    """Random weights as Llama initialises them: normal(0, 0.02) matrices, unit norms."""
    for name, param in module.named_parameters(recurse=False):
        with torch.no_grad():
            if name == "weight" and param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)


def _materialise_(module: nn.Module, device: torch.device, generator: torch.Generator) -> None:
    module.to_empty(device=device)
    for sub in module.modules():
        _fill_(sub, generator)


def _meta_model(config: LlamaConfig) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(config).to(config.dtype)


def _decoder_layers(model: LlamaForCausalLM) -> Iterator[nn.Module]:
    yield from model.model.layers


def _finish(model: LlamaForCausalLM, config: LlamaConfig, device: torch.device) -> None:
    """Materialises what is outside the decoder layers (embeddings, final norm, head, rotary
    tables) and freezes it."""
    generator = torch.Generator(device).manual_seed(1)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        _materialise_(module, device, generator)
        module.requires_grad_(False)
    # Rotary frequencies are a computed buffer, not a weight: rebuild them on the device.
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)


def lorakit_qlora(config: LlamaConfig, device: torch.device) -> LlamaForCausalLM:
    from lorakit.peft import LoraConfig, apply_lora

    model = _meta_model(config)
    generator = torch.Generator(device).manual_seed(0)
    lora = LoraConfig(
        r=LORA_R,
        alpha=LORA_ALPHA,
        dropout=0.0,
        target_modules="all-linear",
        quantize="nf4",
        double_quant=True,
    )
    for layer in _decoder_layers(model):
        _materialise_(layer, device, generator)
        apply_lora(layer, lora)  # quantizes this layer's linears now; the 16-bit copies go
    _finish(model, config, device)
    return model


def _bnb_4bit(linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach(), requires_grad=False, quant_type="nf4", blocksize=64
    )
    return layer.to(device)  # bitsandbytes quantizes on the move


def bnb_model(config: LlamaConfig, device: torch.device) -> LlamaForCausalLM:
    model = _meta_model(config)
    generator = torch.Generator(device).manual_seed(0)
    for layer in _decoder_layers(model):
        _materialise_(layer, device, generator)
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _bnb_4bit(child, config.dtype, device))
        layer.requires_grad_(False)
    _finish(model, config, device)
    return model


def peft_bnb_qlora(config: LlamaConfig, device: torch.device) -> nn.Module:
    import peft

    lora = peft.LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(bnb_model(config, device), lora)


def dense_model(config: LlamaConfig, device: torch.device) -> LlamaForCausalLM:
    model = _meta_model(config)
    generator = torch.Generator(device).manual_seed(0)
    for layer in _decoder_layers(model):
        _materialise_(layer, device, generator)
        layer.requires_grad_(False)
    _finish(model, config, device)
    return model


BUILDERS: dict[str, Callable[[LlamaConfig, torch.device], nn.Module]] = {
    "lorakit": lorakit_qlora,
    "peft_bnb": peft_bnb_qlora,
    "dense": dense_model,
}


def _resident_mib(device: torch.device) -> float:
    """Memory held now: CUDA allocations, or the process's resident set (Linux)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class TotalPeak(Peak):
    """The peak of the timed steps above what the process held before the model was built:
    the memory held when the steps start (model, data) plus the steps' growth above it."""

    def __init__(self, device: torch.device, origin_mib: float) -> None:
        super().__init__(device)
        self.device, self.origin_mib, self.held_mib = device, origin_mib, 0.0

    def start(self) -> None:
        super().start()
        self.held_mib = _resident_mib(self.device) - self.origin_mib

    def total(self) -> float:
        return self.held_mib + self.growth()


def _token_rows(spec: dict[str, Any], count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(spec["seed"])
    vocab = SHAPES[spec["shape"]]["vocab_size"]
    return torch.randint(0, vocab, (count, spec["seq_len"]), generator=generator)


def _train_lorakit(model: nn.Module, spec: dict[str, Any], peak: TotalPeak) -> StepClock:
    from lorakit.data.packing import Row, collate
    from lorakit.train import TrainConfig, Trainer
    from lorakit.train.batches import RowBatches
    from lorakit.train.objectives.causal_lm import CausalLMObjective

    steps = spec["warmup"] + spec["steps"]
    ids = _token_rows(spec, steps * spec["batch"]).tolist()
    rows = [Row(r, r, list(range(len(r)))) for r in ids]
    config = TrainConfig(
        out=spec["out"],
        max_steps=steps,
        batch_size=spec["batch"],
        lr=1e-4,
        resume=False,
        progress=False,
        gradient_checkpointing=True,
        autocast="bf16" if spec["device"] == "cuda" else "off",
    )
    batches = RowBatches(rows, spec["batch"], lambda b: collate(b, 0), config.seed)
    trainer = Trainer(model, config, CausalLMObjective(pad_id=-1), batches)
    model.train()
    clock = StepClock(trainer.device)
    peak.start()
    for step in range(steps):
        clock.begin()
        trainer._step(step)
        clock.end()
    return clock


def _train_peft(model: nn.Module, spec: dict[str, Any], peak: TotalPeak) -> StepClock:
    """The loop a transformers / TRL user's step amounts to: autocast forward with labels,
    backward, clipping, torch AdamW (fused on CUDA, TRL's default there), zeroing."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    # transformers 5 renamed gradient_checkpointing_enable; older releases have only that name.
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    steps = spec["warmup"] + spec["steps"]
    ids = _token_rows(spec, steps * spec["batch"]).to(device)
    model.train()
    clock = StepClock(device)
    peak.start()
    for step in range(steps):
        batch = ids[step * spec["batch"] : (step + 1) * spec["batch"]]
        clock.begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.end()
    return clock


@torch.no_grad()
def _decode(model: nn.Module, spec: dict[str, Any], peak: TotalPeak) -> StepClock:
    """Greedy decoding with a KV cache: a prompt of ``prompt_len`` tokens, then one token per
    row per step; each step after the prompt is timed."""
    device = torch.device(spec["device"])
    model.eval()
    prompt = _token_rows({**spec, "seq_len": spec["prompt_len"]}, spec["batch"]).to(device)
    cache = DynamicCache()
    peak.start()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    clock = StepClock(device)
    for _ in range(spec["warmup"] + spec["steps"]):
        token = out.logits[:, -1:].argmax(-1)
        clock.begin()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        clock.end()
    return clock


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = llama_config(spec["shape"], dtype)
    start = _resident_mib(device)
    model = BUILDERS[spec["library"]](config, device)
    model_mib = _resident_mib(device) - start
    peak = TotalPeak(device, start)
    if spec["task"] == "decode":
        clock = _decode(model, spec, peak)
        tokens_per_step = spec["batch"]
    else:
        run = _train_lorakit if spec["library"] == "lorakit" else _train_peft
        clock = run(model, spec, peak)
        tokens_per_step = spec["batch"] * spec["seq_len"]
    stats = step_stats(clock.wall, clock.cpu, spec["warmup"])
    median_s = stats["median_ms"] / 1000
    return {
        "model_mib": model_mib,
        "peak_mib": peak.total(),
        **stats,
        "tokens_per_s": tokens_per_step / median_s if median_s > 0 else math.inf,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    with tempfile.TemporaryDirectory() as out:
        result = measure({**spec, "out": out})
    Path(argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
