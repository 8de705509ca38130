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


def llama(**overrides) -> nn.Module:
    config = transformers.LlamaConfig(**(SMALL_LLAMA | overrides))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


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
