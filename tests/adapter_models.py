"""Small Hugging Face models built from configs, shared by the adapter lifecycle tests."""

import torch
import transformers
from torch import nn

from lorakit.nn import LoRALinear

SMALL_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


SMALL_GPT2 = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64}
# The tiny model of each architecture the IA3 and prefix-tuning tests run on.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL_LLAMA),
    "mistral": lambda: transformers.MistralConfig(**SMALL_LLAMA),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL_LLAMA),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL_LLAMA, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(**SMALL_GPT2, bos_token_id=0, eos_token_id=0),
}


def llama(**overrides) -> nn.Module:
    config = transformers.LlamaConfig(**(SMALL_LLAMA | overrides))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny(model_type: str) -> nn.Module:
    """A 2-layer causal LM of ``model_type`` (a key of CONFIGS), vocabulary 128."""
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()


def randomize_adapters(model: nn.Module, std: float = 0.1) -> None:
    """A fresh adapter has B = 0; a random B makes the low-rank path count in every check."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for b in m.lora_B.values():
                    b.normal_(std=std)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 throughout; the same products summed in another order (fused op vs PEFT's separate
    # matmuls) differ by a few ulps of the largest term, so compare to the logits' scale.
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "types": [type(m).__name__ for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def train(model: nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """``steps`` of AdamW on the language-model loss of ``ids``; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
