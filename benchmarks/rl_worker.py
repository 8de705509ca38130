"""One configuration of ``bench_rl.py``, measured in a process of its own.

Run as ``python benchmarks/rl_worker.py SPEC.json RESULT.json``; a fresh process per
configuration so that its memory peak is its own (see ``preference_worker.py``, whose
:class:`Peak` and :class:`StepClock` measure here too). The spec's ``variant`` is one of:

- ``sft``: lorakit SFT steps (the causal-LM objective) on ``batch`` rows of ``prompt_len +
  completion_len`` random tokens, loss on the completion;
- ``ppo``: lorakit PPO steps on ``batch`` prompts of ``prompt_len`` random tokens, each sampling
  exactly ``completion_len`` tokens (EOS suppressed), the reward a ``lorakit reward`` adapter
  on the same base, the value model its own adapter and head: every role on one base;
- ``ppo_four_models``: the same PPO steps while the three other roles' models (reference,
  reward, value) are also held as models of their own, each its own copy of the base
  quantized as the policy's is, as TRL's PPO holds them, each run once on a batch of the
  step's shape (the steps themselves still compute on the shared base, so this is a lower
  bound of that layout's memory);
- ``generate_lorakit`` / ``generate_peft``: sampling ``completion_len`` tokens for ``batch``
  prompts with ``generate`` (KV cache, top-k off, EOS suppressed so that every call makes the
  same tokens) through lorakit's QLoRA layers, or PEFT LoRA on a bitsandbytes 4-bit model
  (NF4, double quantization, float32 compute), LoRA rank 16 on every linear layer but the head.

Memory is the peak growth over the process's memory before the model is loaded, so it counts
the weights of every model the variant holds, the adapters, the optimizer state and the step's
activations (CPU: peak RSS; CUDA: ``max_memory_allocated``). On the CPU transformers maps the
safetensors file, so a weight counts once it is read: an embedding table counts the pages of
the rows the batches touch, quantized layers their NF4 copy.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import torch

from lorakit.data.encode import IGNORE
from lorakit.data.packing import Row, collate
from lorakit.data.prompts import Prompt
from lorakit.generation import SamplingOptions
from lorakit.models import ModelConfig, load_model, load_sequence_classifier, load_tokenizer
from lorakit.models.modes import evaluating
from lorakit.peft import LoraConfig
from lorakit.peft.methods import apply_method
from lorakit.recipes import ppo
from lorakit.recipes.common import RunConfig, batches, make_trainable
from lorakit.train import TrainConfig, Trainer
from lorakit.train.objectives import CausalLMObjective
from lorakit.train.ppo import PPOOptions, PPOTrainer
from preference_worker import LORA_ALPHA, LORA_R, Peak, StepClock, serve, step_stats

LR = 1e-5


def _tokens(spec: dict[str, Any], tokenizer: Any, rows: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(spec["seed"])
    low = max(tokenizer.all_special_ids) + 1
    return torch.randint(low, len(tokenizer), (rows, length), generator=generator).tolist()


def _config(spec: dict[str, Any], config_class: type = RunConfig) -> Any:
    return config_class(
        model=ModelConfig(
            model=spec["model_dir"], method=spec["method"], device=spec["device"], dtype="float32"
        ),
        train=TrainConfig(
            out=spec["out"], max_steps=spec["warmup"] + spec["steps"], batch_size=spec["batch"],
            lr=LR, weight_decay=0.0, schedule="constant", warmup=0.0, seed=spec["seed"],
            resume=False, progress=False, save_every=10**6,
        ),
        lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0),
    )  # fmt: skip


def _sft(spec: dict[str, Any], peak: Peak, clock: StepClock) -> dict[str, Any]:
    config = _config(spec)
    peak.start()
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)
    make_trainable(model, config)
    p, c = spec["prompt_len"], spec["completion_len"]
    steps = spec["warmup"] + spec["steps"]
    rows = [
        Row(ids, [IGNORE] * p + ids[p:], list(range(p + c)))
        for ids in _tokens(spec, tokenizer, spec["batch"] * steps, p + c)
    ]
    pad = tokenizer.pad_token_id
    data = batches(config, rows, lambda r: collate(r, pad))
    trainer = Trainer(model, config.train, CausalLMObjective(pad), data)
    model.train()
    for step in range(steps):
        clock.begin()
        trainer._step(step)
        clock.end()
    return {}


def _other_roles(spec: dict[str, Any], config: Any, tokenizer: Any) -> list[torch.nn.Module]:
    """The reference, reward and value models of the four-model layout, each its own copy of
    the base (a causal LM; two sequence classifiers), quantized as the policy is, each run once
    on a batch of the step's shape so that the weights its role reads are resident."""
    copies = [load_model(config.model)]
    copies += [load_sequence_classifier(config.model, tokenizer.pad_token_id) for _ in range(2)]
    length = spec["prompt_len"] + spec["completion_len"]
    ids = torch.tensor(_tokens(spec, tokenizer, spec["batch"], length))
    for model in copies:
        apply_method(model, spec["method"], config)
        model.requires_grad_(False)
        with torch.no_grad():
            model(input_ids=ids.to(next(model.parameters()).device))
    return copies


def _storage_mib(modules: list[torch.nn.Module]) -> float:
    """MiB of the distinct storages behind the modules' parameters and buffers (a tensor that
    several roles share counts once; mapped weights count whole, read or not)."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def _ppo(spec: dict[str, Any], peak: Peak, clock: StepClock) -> dict[str, Any]:
    config = _config(spec, ppo.PPOConfig)
    config.ppo = PPOOptions(reward_adapter=spec["reward_adapter"], updates=spec["updates"])
    config.sampling = SamplingOptions(max_new_tokens=spec["completion_len"])
    peak.start()
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)
    held = _other_roles(spec, config, tokenizer) if spec["four_models"] else []
    # Every completion exactly completion_len tokens long: EOS never sampled.
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    steps = spec["warmup"] + spec["steps"]
    texts = [
        tokenizer.decode(ids)
        for ids in _tokens(spec, tokenizer, spec["batch"] * steps, spec["prompt_len"])
    ]
    head, reward = ppo.prepare(model, tokenizer, config)
    trainer = PPOTrainer(
        model,
        tokenizer,
        config.train,
        config.ppo,
        config.sampling,
        [Prompt(t, t) for t in texts],
        reward,
        head,
    )
    modules = [trainer.trained, *held, *([reward.model] if hasattr(reward, "model") else [])]
    records = []
    with evaluating(trainer.trained):
        for step in range(steps):
            clock.begin()
            records.append(trainer._step(step))
            clock.end()
    timed = records[spec["warmup"] :]
    return {
        "rollout_s": statistics.median(r["rollout_s"] for r in timed),
        "train_s": statistics.median(r["train_s"] for r in timed),
        "completion_length": statistics.median(r["completion_length"] for r in timed),
        "models_held": 1 + len(held),
        "tensor_mib": _storage_mib(modules),
    }


def _generate(spec: dict[str, Any], peak: Peak, clock: StepClock) -> dict[str, Any]:
    peak.start()
    tokenizer = load_tokenizer(ModelConfig(model=spec["model_dir"]))
    if spec["library"] == "lorakit":
        config = _config(spec)
        model = load_model(config.model)
        make_trainable(model, config)
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        base = AutoModelForCausalLM.from_pretrained(
            spec["model_dir"], quantization_config=quantization, dtype=torch.float32
        )
        lora = peft.LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear"
        )
        model = peft.get_peft_model(base, lora)
    model.eval()
    ids = torch.tensor(_tokens(spec, tokenizer, spec["batch"], spec["prompt_len"]))
    n = spec["completion_len"]
    tokens_per_s = []
    for _ in range(spec["warmup"] + spec["steps"]):
        clock.begin()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=0,
                max_new_tokens=n,
                min_new_tokens=n,
                suppress_tokens=[tokenizer.eos_token_id],
                pad_token_id=tokenizer.pad_token_id,
            )
        clock.end()
        made = out.shape[1] - ids.shape[1]
        if made != n:
            raise RuntimeError(f"generate made {made} tokens, not {n}")
        tokens_per_s.append(spec["batch"] * n / clock.wall[-1])
    timed = tokens_per_s[spec["warmup"] :]
    deciles = statistics.quantiles(timed, n=10, method="inclusive") if len(timed) > 1 else timed
    # The p90 of the speed is its slow end: the 10th percentile of tokens per second.
    return {"tokens_per_s": statistics.median(timed), "tokens_per_s_p10": deciles[0]}


def _import_before_measuring(variant: str) -> None:
    """Imports the code the variant loads lazily, so that the memory peak counts data (the
    libraries' code is about 200 MiB of RSS, the same for every variant)."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    if variant == "generate_peft":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one variant: its step times (median, p90), CPU time and memory peak."""
    device = torch.device(spec["device"])
    peak, clock = Peak(device), StepClock(device)
    variant = spec["variant"]
    _import_before_measuring(variant)
    if variant == "sft":
        extra = _sft(spec, peak, clock)
    elif variant.startswith("ppo"):
        extra = _ppo({**spec, "four_models": variant == "ppo_four_models"}, peak, clock)
    else:
        extra = _generate({**spec, "library": variant.removeprefix("generate_")}, peak, clock)
    return {
        **extra,
        "peak_mib": peak.growth(),
        **step_stats(clock.wall, clock.cpu, spec["warmup"]),
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    sys.exit(serve(measure, sys.argv[1:]))
