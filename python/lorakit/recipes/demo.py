"""The README's first command: pre-training then QLoRA SFT in miniature, on the CPU, offline.

1. Pre-train a small Llama (built from a ``LlamaConfig``) on ``demo_data/corpus.txt``: facts
   about invented countries, each stated in several phrasings.
2. QLoRA SFT (NF4 base + LoRA adapters, :class:`lorakit.optim.AdamW`) on questions and answers
   about half of the countries (``demo_data/sft.jsonl``).
3. Ask the same questions about the other half (``demo_data/heldout.jsonl``), which SFT never
   mentioned: the model can only answer from what pre-training stored, so held-out accuracy
   measures whether SFT taught it to *use* its knowledge, not new facts.

Both stages run through the same code as ``lorakit pretrain`` and ``lorakit sft``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.data import DataConfig, prepare
from lorakit.demo_data import facts
from lorakit.models import ModelConfig, load_model, load_tokenizer, tiny_llama, word_tokenizer
from lorakit.models.tiny import check_width
from lorakit.nn import NF4Linear
from lorakit.peft import LoraConfig
from lorakit.recipes import demo_alignment
from lorakit.recipes.common import RunConfig, make_trainable
from lorakit.recipes.demo_alignment import AlignmentReport
from lorakit.recipes.sft import finetune, train_causal_lm
from lorakit.train import TrainConfig
from lorakit.train.evaluate import completion_accuracy
from lorakit.train.metrics import peak_memory_mib
from lorakit.validate import check_number


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and lengths of the demo (the defaults fit in 3 minutes on 2 CPU cores)."""

    out: str = field(default="lorakit-demo", metadata={"path": True, "help": "Output directory."})
    hidden: int = field(default=128, metadata={"help": "Model width."})
    layers: int = field(default=4, metadata={"help": "Decoder layers."})
    pretrain_epochs: float = field(default=40, metadata={"help": "Passes over the corpus."})
    sft_epochs: float = field(
        default=20, metadata={"help": "Passes over the SFT questions and the replayed corpus."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    preferences: bool = field(
        default=True,
        metadata={"help": "After SFT, train a reward model and run DPO on preference pairs."},
    )
    reward_epochs: float = field(
        default=10, metadata={"help": "Passes of the reward model over the preference pairs."}
    )
    dpo_epochs: float = field(default=10, metadata={"help": "Passes of DPO over the pairs."})
    grpo_steps: int = field(
        default=30,
        metadata={
            "help": "GRPO steps from the SFT model on the SFT questions, rewarded when the "
            "answer names the true fact; 0: no GRPO stage."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and data order."})
    threads: int = field(
        default=1,
        metadata={
            "help": "CPU threads for torch. One by default: on a shared 2-core machine, two "
            "OpenMP threads waiting for each other made steps 10 to 20 times slower."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "lora_r", "threads"):
            check_number(name, getattr(self, name), integer=True, low=1)
        check_width(self.hidden)
        check_number("seed", self.seed, integer=True, low=0)
        for name in ("pretrain_epochs", "sft_epochs", "reward_epochs", "dpo_epochs"):
            check_number(name, getattr(self, name), low=0, low_open=True)


@dataclass(frozen=True)
class DemoReport:
    heldout_before: float
    heldout_after: float
    sft_questions_after: float
    recall_pretrained: float
    recall_nf4: float
    recall_after: float
    trainable: int
    total: int
    linear_mib_before: float
    linear_mib_after: float
    peak_rss_mib: float
    seconds: dict[str, float]
    adapter: Path
    plots: tuple[Path, Path]
    alignment: AlignmentReport | None


def build_llama(config: DemoConfig, tokenizer: object) -> nn.Module:
    """The demo's Llama at ``config``'s width and depth, for ``tokenizer``'s vocabulary."""
    return tiny_llama(tokenizer, hidden=config.hidden, layers=config.layers, seed=config.seed)


def _linear_mib(model: nn.Module) -> float:
    """Memory of the decoder's linear weights (what QLoRA quantizes)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            total += m.weight.nbytes
        elif isinstance(m, nn.Linear) and "lm_head" not in name:
            total += m.weight.nbytes
    return total / 2**20


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Within the block, torch uses ``n`` CPU threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shipped_tokenizer() -> object:
    """The word-level tokenizer of every shipped demo file (trained on the spot)."""
    texts = [(facts.HERE / name).read_text() for name in facts.TOKENIZER_FILES]
    return word_tokenizer([line for text in texts for line in text.splitlines()])


def pretrain_config(
    out: Path, seed: int, progress: bool, epochs: float = 1.0, max_steps: int = 0
) -> RunConfig:
    """Full-model pre-training on the shipped corpus (``max_steps`` > 0 overrides ``epochs``)."""
    return RunConfig(
        model=ModelConfig(method="full"),
        # Exact dedup only: sentences from one template differ in a name or two, which MinHash
        # over 5-grams rightly calls near duplicates.
        data=DataConfig(
            data=[str(facts.HERE / "corpus.txt")], format="text", seq_len=64, val_fraction=0.0,
            dedup="exact",
        ),
        train=TrainConfig(
            out=str(out), epochs=epochs, max_steps=max_steps, batch_size=16, lr=3e-3,
            weight_decay=0.0, seed=seed, resume=False, progress=progress,
        ),
    )  # fmt: skip


def sft_replay_config() -> DataConfig:
    """The demo's SFT data: the shipped questions mixed with the pre-training corpus, a tenth
    held out. Replaying the corpus keeps the facts in place while SFT teaches the question
    format: without it SFT's updates overwrite part of what pre-training stored (forgetting)."""
    files = [str(facts.HERE / "sft.jsonl"), str(facts.HERE / "corpus.txt")]
    # Exact dedup only: corpus sentences from one template differ in a name or two.
    return DataConfig(data=files, seq_len=64, val_fraction=0.1, dedup="exact")


def sft_data_config() -> DataConfig:
    """The shipped SFT questions, a tenth of them held out for validation."""
    return DataConfig(data=[str(facts.HERE / "sft.jsonl")], seq_len=64, val_fraction=0.1)


def run(config: DemoConfig) -> DemoReport:
    """Runs the three stages of the module docstring with ``config.threads`` torch threads."""
    with torch_threads(config.threads):
        return _run(config)


def _run(config: DemoConfig) -> DemoReport:
    out = Path(config.out)
    data_dir = facts.HERE
    heldout, probe = _rows(data_dir / "heldout.jsonl"), _rows(data_dir / "probe.jsonl")
    sft_rows = _rows(data_dir / "sft.jsonl")
    tokenizer = shipped_tokenizer()
    seconds = {}

    tic = time.perf_counter()
    pretrain = pretrain_config(
        out / "pretrain", config.seed, config.progress, epochs=config.pretrain_epochs
    )
    base = finetune(build_llama(config, tokenizer), tokenizer, pretrain)
    recall_pretrained = completion_accuracy(base.model, tokenizer, probe)
    seconds["pre-training"] = time.perf_counter() - tic

    tic = time.perf_counter()
    sft = RunConfig(
        model=ModelConfig(model=str(base.saved), method="qlora", device="cpu"),
        data=sft_replay_config(),
        train=TrainConfig(
            out=str(out / "sft"), epochs=config.sft_epochs, batch_size=16, lr=5e-3,
            eval_every=20, seed=config.seed, resume=False, progress=config.progress,
        ),
        lora=LoraConfig(r=config.lora_r, alpha=2 * config.lora_r),
    )  # fmt: skip
    tokenizer = load_tokenizer(sft.model)
    data = prepare(sft.data, tokenizer, config.seed)
    model = load_model(sft.model)
    linear_before = _linear_mib(model)
    quantized = make_trainable(model, sft)
    heldout_before = completion_accuracy(model, tokenizer, heldout)
    recall_nf4 = completion_accuracy(model, tokenizer, probe)
    trained = train_causal_lm(model, tokenizer, sft, data, quantized)
    seconds["QLoRA SFT"] = time.perf_counter() - tic
    heldout_after = completion_accuracy(model, tokenizer, heldout)
    sft_questions_after = completion_accuracy(model, tokenizer, sft_rows)
    recall_after = completion_accuracy(model, tokenizer, probe)
    linear_after = _linear_mib(model)

    alignment = None
    if config.preferences:
        epochs = (config.reward_epochs, config.dpo_epochs)
        alignment = demo_alignment.run(
            base.saved,
            trained.saved,
            out,
            epochs,
            config.lora_r,
            config.seed,
            config.progress,
            config.grpo_steps,
        )
        seconds.update(alignment.seconds)
    return DemoReport(
        heldout_before=heldout_before,
        heldout_after=heldout_after,
        sft_questions_after=sft_questions_after,
        recall_pretrained=recall_pretrained,
        recall_nf4=recall_nf4,
        recall_after=recall_after,
        trainable=quantized.trainable,
        total=quantized.total,
        linear_mib_before=linear_before,
        linear_mib_after=linear_after,
        peak_rss_mib=peak_memory_mib(torch.device("cpu")),
        seconds=seconds,
        adapter=trained.saved,
        plots=(Path(pretrain.train.out) / "loss.png", Path(sft.train.out) / "loss.png"),
        alignment=alignment,
    )


def format_report(r: DemoReport) -> str:
    n = len(_rows(facts.HERE / "heldout.jsonl"))
    return "\n".join(
        [
            f"held-out questions ({n}, about countries SFT never mentioned), greedy exact match:",
            f"  before QLoRA SFT: {r.heldout_before:6.1%}",
            f"  after QLoRA SFT:  {r.heldout_after:6.1%}",
            f"  (SFT's own questions after SFT: {r.sft_questions_after:.1%})",
            'held-out facts completed as sentences ("The capital of X is"): '
            f"{r.recall_pretrained:.1%} pre-trained (float32), {r.recall_nf4:.1%} in NF4 "
            f"before SFT, {r.recall_after:.1%} after SFT",
            f"trainable parameters: {r.trainable:,} of {r.total:,} ({r.trainable / r.total:.2%})",
            f"decoder linear weights: {r.linear_mib_before:.2f} MiB float32 -> "
            f"{r.linear_mib_after:.2f} MiB NF4; peak process memory {r.peak_rss_mib:.0f} MiB",
            "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items()),
            f"adapter: {r.adapter}",
            f"loss curves: {r.plots[0]}, {r.plots[1]}",
            *_alignment_lines(r.alignment),
        ]
    )


def _alignment_lines(a: AlignmentReport | None) -> list[str]:
    if a is None:
        return []
    n = len(_rows(facts.HERE / "preferences_heldout.jsonl"))
    return [
        f"reward model, held-out pairs ({n}, true fact vs another country's), pairwise accuracy:",
        f"  before training: {a.reward_before:6.1%}",
        f"  after training:  {a.reward_after:6.1%}",
        "held-out questions, greedy exact match, DPO on the SFT model (merged, in NF4):",
        f"  before DPO: {a.heldout_sft:6.1%}",
        f"  after DPO:  {a.heldout_dpo:6.1%}",
        f"  (the questions DPO's pairs are about: {a.own_sft:.1%} before, {a.own_dpo:.1%} after)",
        f"reward adapter: {a.reward_adapter}; DPO adapter: {a.dpo_adapter}",
        *_grpo_lines(a),
    ]


def _grpo_lines(a: AlignmentReport) -> list[str]:
    if a.heldout_grpo is None:
        return []
    first, last = a.grpo_curve[0], a.grpo_curve[-1]
    return [
        f"GRPO from the SFT model, {last[0]} steps: mean reward {first[1]:.2f} (step 1) -> "
        f"{last[1]:.2f}, KL {last[2]:.3f}; held-out questions after GRPO: {a.heldout_grpo:.1%}",
    ]
