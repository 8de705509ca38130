"""merge_adapter / unmerge_adapter on models, the NF4 merge drift, and merge_and_export."""

import copy

import pytest
import tokenizers
import torch
import transformers
from torch import nn

from adapter_models import PROJECTIONS, llama, logits, randomize_adapters
from lorakit import (
    LoraConfig,
    apply_lora,
    disable_adapters,
    merge_adapter,
    merge_and_export,
    set_adapter,
    unmerge_adapter,
)
from lorakit.nn import LoRALinear, NF4Linear


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    assert (got - expected).abs().max() <= rel * expected.abs().max()


def test_merge_and_unmerge_a_dense_model():
    model = llama()
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=PROJECTIONS))
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 10))
    adapted = logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    assert merge_adapter(model) == 2 * len(PROJECTIONS)
    # The same sums as the unmerged layers, grouped as (W + s B A) x instead of W x + s B (A x).
    assert_close_to_scale(logits(model, ids), adapted, 1e-5)
    with (
        pytest.raises(ValueError, match="'default' is merged into the base; unmerge it first"),
        disable_adapters(model),
    ):
        pass
    with pytest.raises(ValueError, match="already merged"):
        merge_adapter(model)
    assert unmerge_adapter(model) == 2 * len(PROJECTIONS)
    for name, before in weights.items():
        # Two float32 roundings of w + delta, each within half an ulp of |w| + |delta|.
        after = model.get_parameter(name)
        assert (after - before).abs().max() <= 4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_merge_follows_the_active_adapter():
    model = llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="b")
    randomize_adapters(model)
    ids = torch.randint(0, 128, (1, 8))
    set_adapter(model, "default")
    expected = logits(model, ids)
    assert merge_adapter(model) == 2  # only the layers holding "default"
    assert_close_to_scale(logits(model, ids), expected, 1e-5)
    with pytest.raises(ValueError, match="unmerge it before switching adapters"):
        set_adapter(model, "b")


def nf4_layer(std_b: float) -> tuple[nn.Linear, LoRALinear]:
    dense = nn.Linear(1024, 1024)
    nn.init.normal_(dense.weight, std=0.02)  # a transformer-like weight scale
    layer = LoRALinear(NF4Linear.from_linear(dense), r=16, alpha=32)
    with torch.no_grad():
        layer.lora_B["default"].normal_(std=std_b)
    return dense, layer


@pytest.mark.parametrize("std_b", [0.01, 0.05])  # adapters adding ~7% and ~33% to the output
def test_nf4_merge_drift_is_about_one_nf4_rounding(std_b):
    """How far the merged NF4 layer's output moves from the unmerged one (numbers in README)."""
    dense, layer = nf4_layer(std_b)
    x = torch.randn(64, 1024)
    with torch.no_grad():
        unmerged, base = layer(x), layer.base(x)
        quantization = (base - dense(x)).norm() / dense(x).norm()
        before = layer.base.weight.dequantize()
        layer.merge()
        drift = (layer(x) - unmerged).norm() / unmerged.norm()
        layer.unmerge()
        back = (layer.base.weight.dequantize() - before).norm() / before.norm()
    # Requantizing W + s B A costs about what quantizing W cost in the first place (~9% of the
    # output here): as large as a small adapter's whole effect (std_b = 0.01 adds ~7%).
    assert 0.5 * quantization < drift < 1.2 * quantization
    # Unmerging quantizes once more: the NF4 weight comes back within about one NF4 rounding.
    assert back < 1.5 * quantization


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(127)} | {"[UNK]": 127}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, quantize):
    model = llama()
    apply_lora(model, LoraConfig(r=8, alpha=16, quantize=quantize))
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 10))
    expected = logits(model, ids)
    out = merge_and_export(model, tmp_path / "merged", tokenizer=tiny_tokenizer())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    # Dense, merged in float32: only the grouping of the sums differs (NF4 included, since the
    # export expands the same NF4 codes the adapted model computes with).
    assert_close_to_scale(logits(loaded, ids), expected, 1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out)("t3 t5")["input_ids"] == [3, 5]
    assert torch.equal(logits(model, ids), expected)  # the model itself is unchanged


def test_export_in_bfloat16_sharded_with_the_tokenizer_of_the_base_folder(tmp_path):
    base_dir = tmp_path / "base"
    llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_adapters(model)
    out = merge_and_export(model, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (1, 8))
    expected = logits(model, ids)
    # bfloat16 weights and activations: ~3 significant digits (eps 2^-8) through two layers.
    assert_close_to_scale(logits(loaded, ids).float(), expected, 0.05)


def test_export_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    model = llama()
    apply_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        merge_and_export(model, tmp_path)
    with pytest.raises(TypeError, match="needs a transformers model"):
        merge_and_export(copy.deepcopy(model.model.layers[0]), tmp_path / "x")
