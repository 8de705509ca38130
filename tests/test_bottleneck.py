"""Bottleneck adapters: parameter count, identity at start, a plain-PyTorch reference, training,
named adapters (switching, disabling, merge refused), files (round trip and every way a load can
fail)."""

import copy
import functools
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch.nn import functional as F

import lorakit
from adapter_models import SMALL_LLAMA, assert_unchanged, llama, logits, snapshot, tiny
from lorakit import BottleneckConfig, apply_bottleneck, load_adapter, save_adapter
from lorakit.nn import BottleneckBlock
from lorakit.peft.bottleneck_io import load_bottleneck

HIDDEN, LAYERS = SMALL_LLAMA["hidden_size"], SMALL_LLAMA["num_hidden_layers"]
FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
MODELS = {family: functools.partial(tiny, family) for family in FAMILIES}
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def randomize(model: torch.nn.Module, std: float = 0.2, name: str = "default") -> None:
    """A new adapter's up-projection is zero; random values make the adapter count in checks."""
    with torch.no_grad():
        for _, block in lorakit.peft.bottleneck_layers(model):
            if name not in block.settings:
                continue
            block.bottleneck[name].up.weight.normal_(std=std)
            block.bottleneck[name].up.bias.normal_(std=std)


@pytest.mark.parametrize(
    ("config", "adapters", "size"),
    [
        (BottleneckConfig(), 2 * LAYERS, HIDDEN // 16),
        (BottleneckConfig(placement="mlp", reduction_factor=8), LAYERS, HIDDEN // 8),
        (BottleneckConfig(placement="attention", size=5), LAYERS, 5),
        (BottleneckConfig(reduction_factor=1000), 2 * LAYERS, 1),  # at least one unit
    ],
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainable_count_is_the_analytic_formula(config, adapters, size, family) -> None:
    model = MODELS[family]()
    total = sum(p.numel() for p in model.parameters())
    report = apply_bottleneck(model, config)
    # Each adapter: down (size x hidden + size) and up (hidden x size + hidden).
    expected = adapters * (2 * HIDDEN * size + size + HIDDEN)
    assert report.trainable == expected
    assert report.total == total + expected
    assert len(report.replaced) == adapters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck." in n for n in trainable)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_the_model_starts_equal_to_its_base(family) -> None:
    base = MODELS[family]()
    model = copy.deepcopy(base)
    report = apply_bottleneck(model, BottleneckConfig(nonlinearity="gelu"))
    attention = "attn" if family == "gpt2" else "self_attn"
    assert any(n.endswith(f".0.{attention}") for n in report.replaced)
    torch.testing.assert_close(logits(model, IDS), logits(base, IDS), rtol=0, atol=0)


def reference_logits(base: torch.nn.Module, adapted: torch.nn.Module, act) -> torch.Tensor:
    """The adapted model's logits computed on ``base`` with forward hooks: after each adapted
    sub-block, ``h + (act(h Wd^T + bd)) Wu^T + bu`` with the adapted model's weights."""
    weights = {n: p.detach() for n, p in adapted.named_parameters()}

    def hook(name: str):
        def adapt(module, args, out):
            def f(h):
                key = f"{name}.bottleneck.default"
                d = weights[f"{key}.down.weight"], weights[f"{key}.down.bias"]
                u = weights[f"{key}.up.weight"], weights[f"{key}.up.bias"]
                return h + act(h @ d[0].T + d[1]) @ u[0].T + u[1]

            return (f(out[0]), *out[1:]) if isinstance(out, tuple) else f(out)

        return adapt

    handles = [
        base.get_submodule(n).register_forward_hook(hook(n))
        for n, _ in lorakit.peft.bottleneck_layers(adapted)
    ]
    try:
        return logits(base, IDS)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(
    ("nonlinearity", "act"),
    [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu), ("tanh", torch.tanh)],
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_outputs_equal_a_plain_pytorch_reference(family, nonlinearity, act) -> None:
    base = MODELS[family]()
    model = copy.deepcopy(base)
    apply_bottleneck(model, BottleneckConfig(size=8, nonlinearity=nonlinearity))
    randomize(model)
    expected = reference_logits(base, model, act)
    got = logits(model, IDS)
    assert (got - logits(base, IDS)).abs().max() > 1e-2  # the adapters do change the output
    # float32, the same operations in the same order: equal up to a few ulps.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_it_trains_and_leaves_the_base_alone() -> None:
    model = llama()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_bottleneck(model, BottleneckConfig(size=32))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # A random, frozen base and lm_head: the adapters alone pull the loss down, steadily
    # (4.90 -> 4.38 when written; a model without adapters would stay at 4.90).
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < losses[10] - 0.1, losses
    state = model.state_dict()
    for key, value in frozen.items():  # the wrapped sub-blocks' weights moved under ".base."
        moved = key.replace(".self_attn.", ".self_attn.base.").replace(".mlp.", ".mlp.base.")
        assert torch.equal(state[moved], value), key


def test_round_trip_through_files_gives_the_same_logits(tmp_path) -> None:
    base = llama()
    model = copy.deepcopy(base)
    apply_bottleneck(model, BottleneckConfig(placement="both", size=8, nonlinearity="silu"))
    randomize(model)
    assert save_adapter(model, tmp_path) == tmp_path
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAKIT_BOTTLENECK"
    assert (config["placement"], config["size"], config["nonlinearity"]) == ("both", 8, "silu")
    keys = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.mlp.bottleneck.up.weight" in keys
    assert len(keys) == 4 * 2 * LAYERS

    fresh = copy.deepcopy(base)
    loaded = load_adapter(fresh, tmp_path, trainable=True)
    assert loaded == sorted(config["target_modules"])
    torch.testing.assert_close(logits(fresh, IDS), logits(model, IDS), rtol=0, atol=0)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = copy.deepcopy(base)
    load_adapter(frozen, tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_gpt2_round_trip(tmp_path) -> None:
    base = tiny("gpt2")
    model = copy.deepcopy(base)
    apply_bottleneck(model, BottleneckConfig(placement="mlp"))
    randomize(model)
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path) == [f"transformer.h.{i}.mlp" for i in range(LAYERS)]
    torch.testing.assert_close(logits(fresh, IDS), logits(model, IDS), rtol=0, atol=0)


def test_unsupported_models_and_second_applications_are_refused() -> None:
    with pytest.raises(ValueError, match="no decoder layer with an 'mlp'"):
        apply_bottleneck(torch.nn.Sequential(torch.nn.Linear(4, 4)), BottleneckConfig())
    model = llama()
    apply_bottleneck(model, BottleneckConfig())
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has a bottleneck adapter named 'default'"):
        apply_bottleneck(model, BottleneckConfig())
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        BottleneckConfig(nonlinearity="swish")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        BottleneckConfig(size=0)


def test_save_refuses_an_unknown_name(tmp_path) -> None:
    model = llama()
    apply_bottleneck(model, BottleneckConfig())
    with pytest.raises(ValueError, match="no bottleneck layer holds an adapter named 'other'"):
        save_adapter(model, tmp_path, name="other")
    assert not (tmp_path / "adapter_config.json").exists()


@pytest.fixture
def saved(tmp_path) -> Path:
    model = llama()
    apply_bottleneck(model, BottleneckConfig(size=4))
    randomize(model)
    return save_adapter(model, tmp_path / "adapter")


def rewrite(folder: Path, change) -> None:
    path = folder / "adapter_model.safetensors"
    safetensors.torch.save_file(change(safetensors.torch.load_file(path)), path)


def rename(tensors):
    return {k.replace("layers.1.mlp", "layers.1.mlq"): v for k, v in tensors.items()}


def widen(tensors):
    key = "base_model.model.model.layers.0.self_attn.bottleneck.up.weight"
    return {**tensors, key: torch.zeros(HIDDEN, 5)}


def drop_bias(tensors):
    return {k: v for k, v in tensors.items() if not k.endswith("layers.0.mlp.bottleneck.up.bias")}


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, "does not exist"),
        (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "does not exist"),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00" + b"x" * 40),
            ValueError,
            "is not a readable safetensors file",
        ),
        (lambda d: edit_config(d, peft_type="ADAPTER"), ValueError, "'ADAPTER' is not one"),
        (lambda d: edit_config(d, nonlinearity="swish"), ValueError, "'swish' is not supported"),
        (lambda d: edit_config(d, size=0), ValueError, "size must be a positive integer"),
        (lambda d: rewrite(d, rename), ValueError, "'model.layers.1.mlq' matches no attention"),
        (lambda d: rewrite(d, widen), ValueError, r"up.weight has shape \[64, 5\], expected"),
        (lambda d: edit_config(d, size=5), ValueError, r"down.weight has shape \[4, 64\]"),
        (lambda d: rewrite(d, drop_bias), ValueError, r"layers.0.mlp lacks \['up.bias'\]"),
        (
            lambda d: rewrite(
                d, lambda t: {**t, "base_model.model.x.lora_A.weight": torch.zeros(2)}
            ),
            ValueError,
            "is not a bottleneck weight",
        ),
        (
            lambda d: edit_config(d, target_modules=["model.layers.0.self_attn"]),
            ValueError,
            "adapter: adapter_model.safetensors disagrees with adapter_config.json: it has weights "
            "for model.layers.0.mlp, model.layers.1.mlp, model.layers.1.self_attn, which",
        ),
        (
            lambda d: rewrite(d, lambda t: {k: v for k, v in t.items() if ".1.mlp." not in k}),
            ValueError,
            "adapter: adapter_model.safetensors disagrees with adapter_config.json: "
            "target_modules names model.layers.1.mlp, which it has no weights for",
        ),
    ],
)
def test_bad_files_are_clear_errors_and_leave_the_model_unchanged(saved, damage, error, match):
    damage(saved)
    model = llama()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter(model, saved)
    assert_unchanged(model, before)


def test_load_bottleneck_refuses_other_peft_types(tmp_path) -> None:
    model = llama()
    lorakit.apply_lora(model, lorakit.LoraConfig(r=2))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="peft_type 'LORA' is not 'LORAKIT_BOTTLENECK'"):
        load_bottleneck(llama(), tmp_path, config, "default", False)


def test_loading_a_taken_name_is_refused_and_another_name_is_added(saved) -> None:
    base = llama()
    model = copy.deepcopy(base)
    apply_bottleneck(model, BottleneckConfig())
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has a bottleneck adapter named 'default'"):
        load_adapter(model, saved)
    assert_unchanged(model, before)
    assert load_adapter(model, saved, name="saved") == sorted(
        f"model.layers.{i}.{m}" for i in range(LAYERS) for m in ("self_attn", "mlp")
    )
    assert sum(isinstance(m, BottleneckBlock) for m in model.modules()) == 2 * LAYERS
    assert lorakit.peft.adapter_names(model) == ["default", "saved"]
    assert lorakit.peft.active_adapter(model) == "default"  # a load keeps the active adapter
    fresh = copy.deepcopy(base)
    load_adapter(fresh, saved)
    lorakit.set_adapter(model, "saved")
    torch.testing.assert_close(logits(model, IDS), logits(fresh, IDS), rtol=0, atol=0)


def test_two_named_adapters_switch_and_disable_adapters_gives_the_base() -> None:
    base = llama()
    model = copy.deepcopy(base)
    apply_bottleneck(model, BottleneckConfig(size=4), name="a")
    randomize(model, name="a")
    report = apply_bottleneck(model, BottleneckConfig(placement="mlp", size=8), name="b")
    randomize(model, name="b")
    assert len(report.replaced) == LAYERS
    assert lorakit.peft.adapter_names(model) == ["a", "b"]
    assert lorakit.peft.active_adapter(model) == "b"  # the new adapter is active and trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck.b." in n for n in trainable)
    with_b = logits(model, IDS)
    lorakit.set_adapter(model, "a")
    with_a = logits(model, IDS)
    # each equals a model holding that adapter alone (b only after the MLPs)
    only_a, only_b = copy.deepcopy(base), copy.deepcopy(base)
    apply_bottleneck(only_a, BottleneckConfig(size=4), name="a")
    apply_bottleneck(only_b, BottleneckConfig(placement="mlp", size=8), name="b")
    state = model.state_dict()
    only_a.load_state_dict({k: v for k, v in state.items() if ".bottleneck.b." not in k})
    only_b.load_state_dict(
        {k: v for k, v in state.items() if ".bottleneck.a." not in k and "self_attn.base." not in k}
        | {k: v for k, v in base.state_dict().items() if ".self_attn." in k}
    )
    torch.testing.assert_close(with_a, logits(only_a, IDS), rtol=0, atol=0)
    torch.testing.assert_close(with_b, logits(only_b, IDS), rtol=0, atol=0)
    assert (with_a - with_b).abs().max() > 1e-2
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, IDS), logits(base, IDS), rtol=0, atol=0)
    torch.testing.assert_close(logits(model, IDS), with_a, rtol=0, atol=0)  # on again
    before = snapshot(model)
    with pytest.raises(ValueError, match="bottleneck adapters cannot be merged"):
        lorakit.merge_adapter(model)
    assert_unchanged(model, before)
