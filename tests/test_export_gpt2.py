"""merge_and_export of GPT-2, whose Conv1D layers store W as (in, out), with LoRA and IA3."""

import pytest
import safetensors.torch
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from adapter_models import assert_logits_close, logits, randomize_adapters, tiny
from lorakit import IA3Config, LoraConfig, apply_ia3, apply_lora, merge_and_export
from lorakit.nn import IA3Linear


def adapted_gpt2(method: str, quantize: str | None) -> torch.nn.Module:
    model = tiny("gpt2")
    if method == "lora":  # every Conv1D: c_attn, attn.c_proj, c_fc, mlp.c_proj
        apply_lora(model, LoraConfig(r=4, alpha=8, quantize=quantize))
        randomize_adapters(model)
    else:  # c_attn scaled on its output, mlp.c_proj on its input
        apply_ia3(model, IA3Config(quantize=quantize))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, IA3Linear):
                    m.ia3_l["default"].normal_(mean=1.0, std=0.3)
    return model


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, method, quantize):
    model = adapted_gpt2(method, quantize)
    ids = torch.randint(0, 128, (2, 10))
    expected = logits(model, ids)
    out = merge_and_export(model, tmp_path / "merged")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, transformers.GPT2LMHeadModel)
    assert isinstance(loaded.transformer.h[0].attn.c_attn, Conv1D)
    # Dense, merged in float32 (NF4 expanded from the codes the adapted model uses): only the
    # grouping of the sums differs.
    assert_logits_close(logits(loaded, ids), expected)
    assert torch.equal(logits(model, ids), expected)  # the model itself is unchanged


def test_exported_weights_have_the_checkpoints_layout(tmp_path):
    base = tiny("gpt2")
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    model = adapted_gpt2("lora", None)
    out = merge_and_export(model, tmp_path / "merged")
    written = safetensors.torch.load_file(out / "model.safetensors")
    # (in, out) = (64, 192) for c_attn: the original Conv1D layout, not the adapter's Wᵀ.
    assert written["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    assert {k: v.shape for k, v in written.items()} == {k: shapes[k] for k in written}
