"""Prefix tuning against PEFT's: logits and loss, parameter counts, files both ways, training."""

import copy
import inspect
import json

import peft
import pytest
import safetensors.torch
import torch
from transformers import DynamicCache

from adapter_models import (
    assert_logits_close,
    assert_unchanged,
    llama,
    logits,
    snapshot,
    tiny,
    train,
)
from lorakit import (
    LoraConfig,
    PrefixTuningConfig,
    apply_lora,
    apply_prefix_tuning,
    disable_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_adapter,
)
from lorakit.peft.prefix import SUPPORTED_MODEL_TYPES

TOKENS = 5


def peft_prefix(base: torch.nn.Module) -> peft.PeftModel:
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def their_prefix(model: peft.PeftModel) -> torch.nn.Parameter:
    return model.prompt_encoder["default"].embedding.weight


def same_prefix_as(theirs: peft.PeftModel, base: torch.nn.Module) -> torch.nn.Module:
    ours = copy.deepcopy(base)
    apply_prefix_tuning(ours, PrefixTuningConfig(num_virtual_tokens=TOKENS))
    with torch.no_grad():
        ours.lorakit_prefix.embedding["default"].copy_(their_prefix(theirs))
    return ours


def left_padded(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0  # the first row is padded on the left, as batched causal LMs are
    return ids, mask


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_same_logits_loss_and_parameter_count_as_peft(arch):
    base = tiny(arch)
    theirs = peft_prefix(base)
    ours = same_prefix_as(theirs, base)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    total = sum(p.numel() for p in ours.parameters())
    assert (trainable, total) == theirs.get_nb_trainable_parameters()
    ids, mask = left_padded(2, 9)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, labels=ids)
        got = ours(input_ids=ids, attention_mask=mask, labels=ids)
        assert got.logits.shape == (2, 9, 128)
        assert_logits_close(got.logits, expected.logits)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
        # Without a mask, and positionally, as model(ids) is often called.
        assert_logits_close(ours(ids).logits, theirs(input_ids=ids).logits)
        # The prefix matters: without it the logits are the base model's.
        assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-3
        with disable_adapters(ours):
            assert_logits_close(ours(ids).logits, base(ids).logits)


def test_report_counts_like_peft():
    base = llama()
    report = apply_prefix_tuning(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=7))
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
    assert report.trainable == 7 * 2 * 2 * 2 * 16  # tokens x layers x (k, v) x kv heads x head


def test_position_ids_are_shifted_like_peft():
    base = llama()
    theirs = peft_prefix(base)
    ours = same_prefix_as(theirs, base)
    ids = torch.randint(0, 128, (2, 6))
    positions = torch.arange(6).expand(2, -1)
    with torch.no_grad():
        expected = theirs(input_ids=ids, position_ids=positions).logits
        assert_logits_close(ours(input_ids=ids, position_ids=positions).logits, expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_saved_prefix_loads_in_peft_and_peft_files_load_in_lorakit(tmp_path, arch):
    base = tiny(arch)
    theirs = peft_prefix(base)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    assert load_adapter(ours, tmp_path / "peft") == ["lorakit_prefix"]
    ids, mask = left_padded(2, 8)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        assert_logits_close(ours(input_ids=ids, attention_mask=mask).logits, expected)
    assert not any(p.requires_grad for p in ours.parameters())  # trainable=False by default

    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_logits_close(again(input_ids=ids, attention_mask=mask).logits, expected)
    mine = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    reference = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in (
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "num_layers",
        "token_dim",
        "num_attention_heads",
        "num_transformer_submodules",
        "encoder_hidden_size",
        "prefix_projection",
    ):
        assert config[key] == their_config[key], key


def test_projected_peft_prefix_loads_as_its_projection(tmp_path):
    """With prefix_projection PEFT saves the MLP's output, which lorakit loads as the prefix."""
    base = llama()
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=TOKENS, prefix_projection=True
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    ids = torch.randint(0, 128, (2, 8))
    theirs.eval()
    with torch.no_grad():
        assert_logits_close(ours(ids).logits, theirs(input_ids=ids).logits)


def test_trains_like_peft_and_the_loss_goes_down():
    base = llama()
    theirs = peft_prefix(base)
    ours = same_prefix_as(theirs, base)
    ids = torch.randint(0, 128, (4, 16))
    expected = train(theirs.train(), ids, steps=25, lr=0.1)
    losses = train(ours.train(), ids, steps=25, lr=0.1)
    # The same start and the same AdamW steps: the same path, to float32 rounding.
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=0)
    assert losses[-1] < losses[0] - 0.1
    prefix = ours.lorakit_prefix.embedding["default"]
    assert not torch.equal(prefix, their_prefix(peft_prefix(base)))
    assert all(p.grad is None for n, p in ours.named_parameters() if "lorakit_prefix" not in n)


def test_named_prefixes_switch_and_a_copy_has_its_own(tmp_path):
    base = llama()
    model = copy.deepcopy(base)
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=3), name="a")
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=6), name="b")
    ids = torch.randint(0, 128, (1, 7))
    b = logits(model, ids)
    set_adapter(model, "a")
    a = logits(model, ids)
    assert (a - b).abs().max() > 1e-3
    save_adapter(model, tmp_path / "b", name="b")
    only_b = copy.deepcopy(base)
    load_adapter(only_b, tmp_path / "b")
    torch.testing.assert_close(logits(only_b, ids), b, rtol=0, atol=0)
    # deepcopy hooks the copy's own prefix, not the original's.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lorakit_prefix.embedding["a"].zero_()
    torch.testing.assert_close(logits(model, ids), a, rtol=0, atol=0)
    assert (logits(twin, ids) - a).abs().max() > 1e-3


def test_unsupported_models_and_calls_are_clear_errors():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = snapshot(plain)
    with pytest.raises(ValueError, match="prefix tuning supports Hugging Face causal LMs"):
        apply_prefix_tuning(plain, PrefixTuningConfig())
    assert_unchanged(plain, before)
    model = llama()
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prefix tuning adapters cannot be merged"):
        merge_adapter(model)
    with pytest.raises(ValueError, match="already has a prefix named 'default'"):
        apply_prefix_tuning(model, PrefixTuningConfig())
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PrefixTuningConfig(num_virtual_tokens=0)


def loss_and_prefix_grad(model, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(0)  # GPT-2's dropout: the same masks in both runs
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.detach(), model.lorakit_prefix.embedding["default"].grad.clone()


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradient(arch):
    # The Trainer's runs with and without checkpointing agree too: test_trainer.py.
    model = tiny(arch)
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=3))
    ids, mask = left_padded(2, 6)
    expected = loss_and_prefix_grad(model.train(), ids, mask)
    model.activation_checkpointing_enable({"use_reentrant": False})
    layer = next(m for m in model.modules() if hasattr(m, "_can_checkpoint_with_cache"))
    runs = []
    # Inside the checkpointed layer (transformers checkpoints its forward, not its hooks).
    hook = next(layer.children()).register_forward_hook(lambda *_: runs.append(1))
    got = loss_and_prefix_grad(model, ids, mask)
    hook.remove()
    assert len(runs) == 2  # the backward ran the layer again, with the prefix
    # The recomputed layer repeats the same float operations: the same loss and gradient.
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert expected[1].abs().sum() > 0


def test_a_checkpointed_call_leaves_the_model_as_it_was_even_when_it_raises():
    model = llama()
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2))
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 128, (2, 6))
    layer, backbone = model.model.layers[0], model.model
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="batch_size"):
        model(input_ids=ids, labels=ids[:, :3])  # labels of the wrong length
    assert "_can_checkpoint_with_cache" not in vars(layer)
    assert backbone.gradient_checkpointing is True
    with pytest.raises(ValueError, match="gradient-checkpointed training call takes no cache"):
        model(input_ids=ids, cache=DynamicCache())


def test_a_transformers_release_whose_checkpointed_layers_drop_the_cache_is_refused(monkeypatch):
    from transformers.modeling_layers import GradientCheckpointingLayer

    monkeypatch.delattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
    model = llama()
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2))
    model.activation_checkpointing_enable({"use_reentrant": False})
    ids = torch.randint(0, 128, (1, 4))
    with pytest.raises(ValueError, match="drops the cache, which carries the prefix"):
        model.train()(input_ids=ids, labels=ids)
    with torch.no_grad():  # nothing is checkpointed without gradients
        model(input_ids=ids)


GREEDY = {"do_sample": False, "max_new_tokens": 8, "pad_token_id": 0}


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Left padding's positions, as generate() computes them: 0 at each row's first token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def greedy_by_full_forwards(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    """GREEDY's tokens without a cache: each one from a forward over the whole sequence."""
    for _ in range(GREEDY["max_new_tokens"]):
        step = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        token = step[:, -1].argmax(dim=-1, keepdim=True)
        ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_greedy_generate_matches_greedy_decoding_by_peft_forwards(arch):
    base = tiny(arch)
    theirs = peft_prefix(base)
    ours = same_prefix_as(theirs, base)
    ids, mask = left_padded(2, 7)
    ids = ids.clamp(min=1)  # no pad token (0) in the prompt, so generate() infers no mask
    # PEFT 0.21.2's own generate() with a prefix relies on transformers internals that 5.24
    # removed and then gives other tokens (README, compatibility notes); its forward is right,
    # and the same as ours (test above), so its greedy decoding by full forwards is the reference.
    with torch.no_grad():
        for prompt_mask in (None, mask):
            got = ours.generate(ids, attention_mask=prompt_mask, **GREEDY)
            full_mask = torch.ones_like(mask) if prompt_mask is None else prompt_mask
            torch.testing.assert_close(got, greedy_by_full_forwards(theirs, ids, full_mask))
        # Beam search reorders the cache that holds the prefix: the beams without a cache.
        beams = {"attention_mask": mask, "num_beams": 2, **GREEDY}
        expected = ours.generate(ids, use_cache=False, **beams)
        torch.testing.assert_close(ours.generate(ids, **beams), expected)
        # The prefix changes what is generated; disabled, it is the base model's generate().
        assert not torch.equal(got, base.generate(ids, attention_mask=mask, **GREEDY))
        with disable_adapters(ours):
            expected = base.generate(ids, attention_mask=mask, **GREEDY)
            torch.testing.assert_close(ours.generate(ids, attention_mask=mask, **GREEDY), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("with_prefix_in_mask", [False, True])
def test_incremental_decoding_gives_the_full_forward_logits(arch, with_prefix_in_mask):
    model = tiny(arch)
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=TOKENS))
    ids, mask = left_padded(2, 10)
    prompt = 6
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        out = model(
            input_ids=ids[:, :prompt],
            attention_mask=mask[:, :prompt],
            position_ids=positions(mask)[:, :prompt],
            use_cache=True,
        )
        steps = [out.logits]
        for i in range(prompt, ids.shape[1]):
            step_mask = mask[:, : i + 1]
            if with_prefix_in_mask:  # a mask over the whole cache is taken as it is
                step_mask = torch.cat([torch.ones(2, TOKENS, dtype=mask.dtype), step_mask], 1)
            out = model(
                input_ids=ids[:, i : i + 1],
                attention_mask=step_mask,
                position_ids=positions(mask)[:, i : i + 1],
                past_key_values=out.past_key_values,
            )
            steps.append(out.logits)
    assert out.past_key_values.get_seq_length() == TOKENS + ids.shape[1]
    assert_logits_close(torch.cat(steps, dim=1), full)


def cache_argument(model: torch.nn.Module) -> str:
    """The name model.forward gives its cache: ``cache`` from transformers 5.24 on."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def test_an_empty_cache_is_started_with_the_prefix_in_place():
    model = llama()
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=TOKENS))
    ids = torch.randint(0, 128, (2, 6))
    cache = DynamicCache()
    # The forward's own name for the cache here; the incremental decoding test uses the
    # legacy past_key_values (an alias from transformers 5.24 on).
    name = cache_argument(model)
    with torch.no_grad():
        got = model(ids[:, :4], **{name: cache}, use_cache=True).logits
        assert cache.get_seq_length() == TOKENS + 4  # the caller's object, filled
        last = model(ids[:, 4:], **{name: cache}).logits
        assert_logits_close(torch.cat([got, last], dim=1), logits(model, ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_use_cache_false_returns_no_cache_and_generate_without_one_agrees(arch):
    base = tiny(arch)
    model = copy.deepcopy(base)
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=TOKENS))
    ids, mask = left_padded(2, 7)
    ids = ids.clamp(min=1)
    with torch.no_grad():
        # As the model without a prefix: no cache back when none is asked for, in either form.
        for kwargs in ({}, {"return_dict": False}):
            got = model(ids, use_cache=False, **kwargs)
            expected = base(ids, use_cache=False, **kwargs)
            assert len(got) == len(expected)
            assert_logits_close(got[0], logits(model, ids))
        assert model(ids, use_cache=True).past_key_values.get_seq_length() == TOKENS + 7
        # Without a cache generate() feeds the whole sequence each step; the cached path it
        # must agree with is the one checked against PEFT above (PEFT 0.21.2's own
        # generate(use_cache=False) with a prefix fails or differs on Llama).
        cached = model.generate(ids, attention_mask=mask, **GREEDY)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **GREEDY)
    torch.testing.assert_close(uncached, cached)


def test_caches_without_this_prefix_are_refused():
    model = llama()
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=TOKENS), name="a")
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2), name="b")
    ids = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        with disable_adapters(model):
            plain = model(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="4 positions that lorakit's prefix did not start"):
            model(ids, past_key_values=plain)
        with_b = model(ids, use_cache=True).past_key_values
        set_adapter(model, "a")
        with pytest.raises(ValueError, match="holds prefix 'b' but the active one is 'a'"):
            model(ids, past_key_values=with_b)
        with disable_adapters(model), pytest.raises(ValueError, match="the prefix is off"):
            model(ids, past_key_values=with_b)
        with_a = model(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="attention_mask has 3 columns; expected 5"):
            model(ids[:, :1], attention_mask=torch.ones(1, 3), past_key_values=with_a)
        legacy = tuple((k, v) for k, v, _ in with_a)
        with pytest.raises(ValueError, match=r"got (cache|past_key_values) of type tuple"):
            model(ids, past_key_values=legacy)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_continuing_from_a_prefix_cache_is_refused(padded):
    # generate() counts the cache's positions as input tokens; with a prefix it would feed the
    # wrong tokens at the wrong positions. Unpadded, generate() drops the mask of ones; padded,
    # the row without padding gives the call away. (12 tokens: the mask then covers the prefix
    # too, as a caller's own mask may, so its width alone says nothing.)
    model = llama()
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=TOKENS))
    model.eval()
    ids, mask = left_padded(2, 12) if padded else (torch.randint(0, 128, (1, 12)), None)
    with torch.no_grad():
        start = {} if mask is None else {"attention_mask": mask[:, :4]}
        cache = model(ids[:, :4], use_cache=True, **start).past_key_values
    with pytest.raises(ValueError, match=r"position_ids start at .* holds 4 tokens"):
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GREEDY)


@pytest.fixture
def saved(tmp_path):
    model = llama()
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=TOKENS))
    return save_adapter(model, tmp_path / "prefix")


def set_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def set_tensor(folder, tensors) -> None:
    safetensors.torch.save_file(tensors, folder / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: set_config(d, num_layers=3), "num_layers=3 does not fit LlamaForCausalLM"),
        (lambda d: set_config(d, token_dim=64), "token_dim=64 does not fit"),
        (lambda d: set_config(d, task_type="SEQ_2_SEQ_LM"), "task_type 'SEQ_2_SEQ_LM'"),
        (lambda d: set_config(d, num_virtual_tokens=4), r"\[5, 128\] does not fit"),
        (
            lambda d: set_tensor(d, {"prefix_encoder.embedding.weight": torch.zeros(5, 128)}),
            "expected one tensor 'prompt_embeddings'",
        ),
        (lambda d: set_config(d, peft_type="P_TUNING"), "peft_type 'P_TUNING' is not one"),
    ],
    ids=["layers", "kv-width", "task", "tokens", "key", "other-method"],
)
def test_bad_files_are_clear_errors_and_leave_the_model_as_it_was(saved, damage, match):
    damage(saved)
    model = llama()
    apply_lora(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, saved)
    assert_unchanged(model, before)
    assert not hasattr(model, "lorakit_prefix")


def test_prefix_files_for_another_model_are_refused(saved):
    gpt2 = tiny("gpt2")
    before = snapshot(gpt2)
    with pytest.raises(ValueError, match="does not fit GPT2LMHeadModel"):
        load_adapter(gpt2, saved)
    assert_unchanged(gpt2, before)
