"""The SFT and DPO objectives through the fused linear cross-entropy equal their unfused paths
(loss and every trainable gradient): a LoRA'd tiny Llama (frozen head) and a fully fine-tuned
tiny GPT-2 (head tied to the embedding, so its gradient comes from the fused op and the
embedding lookup together) and a tiny Gemma 2 (final logit soft-capping)."""

import argparse

import pytest
import torch
import transformers

from lorakit import LoraConfig, apply_lora, ops
from lorakit.config_args import add_arguments, build
from lorakit.data import IGNORE
from lorakit.recipes.dpo import DPOConfig
from lorakit.recipes.sft import SFTConfig
from lorakit.train.objectives import CausalLMObjective
from lorakit.train.objectives.dpo import ADAPTERS_OFF, DPOObjective
from lorakit.train.objectives.hidden import plain_head

VOCAB, ROWS, LENGTH = 300, 4, 24


def llama_with_lora() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for b in (b for m in model.modules() for b in getattr(m, "lora_B", {}).values()):
        torch.nn.init.normal_(b, std=0.2)  # a non-zero adapter: its gradients are all non-zero
    return model


def gpt2_full() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def gemma2_softcap() -> torch.nn.Module:
    """Gemma 2 soft-caps its logits (30 c tanh(z / 30)): the fused op must apply it too."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
        final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():  # logits of a few tens, where the cap bends them
        model.lm_head.weight.mul_(200)
    return model


MODELS = {"llama-lora": llama_with_lora, "gpt2-tied-full": gpt2_full, "gemma2": gemma2_softcap}


def token_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (ROWS, LENGTH))
    labels = ids.clone()
    labels[:, :8] = IGNORE  # the prompt
    labels[0, 20:] = IGNORE  # padding
    positions = torch.arange(LENGTH).expand(ROWS, -1)
    mask = (labels != IGNORE).long()
    mask[:, :8] = 1
    return {
        "input_ids": ids,
        "position_ids": positions,
        "labels": labels,
        "attention_mask": mask,
        "margin": torch.zeros(ROWS // 2),
    }


def loss_and_grads(model, objective, batch):
    model.zero_grad()
    out = objective(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same(fused, unfused):
    (out_f, grads_f), (out_u, grads_u) = fused, unfused
    assert out_f.count == out_u.count
    # Both run the model in float32; they differ in the head's GEMM blocking and the softmax's
    # sums (a polynomial exp, summed in another order): a few float32 ulps of each value.
    torch.testing.assert_close(out_f.loss_sum, out_u.loss_sum, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_u.keys() and grads_f
    for name, g in grads_f.items():
        scale = grads_u[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(g, grads_u[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def spying(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(ops, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, name, spy)
    return calls


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_sft_objective_fused_equals_unfused(make, monkeypatch):
    model, batch = make(), token_batch()
    assert plain_head(model) is not None
    calls = spying(monkeypatch, "fused_linear_cross_entropy")
    fused = loss_and_grads(model, CausalLMObjective(0, fused_ce=True), batch)
    assert calls == [1]
    unfused = loss_and_grads(model, CausalLMObjective(0, fused_ce=False), batch)
    assert calls == [1]
    assert_same(fused, unfused)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_dpo_objective_fused_equals_unfused(make, monkeypatch):
    model, batch = make(), token_batch()
    reference = ADAPTERS_OFF if make is llama_with_lora else make().requires_grad_(False)
    calls = spying(monkeypatch, "fused_linear_logprobs")
    fused = loss_and_grads(model, DPOObjective(reference, fused_ce=True), batch)
    assert len(calls) == 2  # the policy's and the reference's log-probs
    unfused = loss_and_grads(model, DPOObjective(reference, fused_ce=False), batch)
    assert len(calls) == 2
    assert_same(fused, unfused)
    for key in ("chosen_logp", "rejected_logp", "reward_margin"):
        assert fused[0].metrics[key] == pytest.approx(unfused[0].metrics[key], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-fused-ce"], False)])
def test_the_cli_flag_switches_the_fused_path(flag, expected):
    for cls in (SFTConfig, DPOConfig):
        parser = argparse.ArgumentParser()
        add_arguments(parser, cls, set())
        config = build(cls, parser.parse_args(["--model", "m", *flag]), set(), {})
        assert config.train.fused_ce is expected
