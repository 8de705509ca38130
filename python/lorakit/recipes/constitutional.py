"""``lorakit constitutional``: the model critiques and revises its own answers against written
principles; the revisions become SFT data (``sft.jsonl``) and, against the first answers,
preference pairs (``preferences.jsonl``), which ``lorakit sft`` and ``lorakit dpo`` read as they
are. Every step is kept in ``trace.jsonl``; an interrupted run resumes with the same command.
See :mod:`lorakit.constitutional` for the pieces."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from lorakit.constitutional import (
    DEFAULT,
    Generator,
    ModelGenerator,
    Outputs,
    critique_batch,
    judge_batch,
    load_principles,
)
from lorakit.constitutional.conversation import as_messages
from lorakit.constitutional.lengths import LoopShape, check_lengths
from lorakit.constitutional.principles import Principle
from lorakit.data.prompts import load_prompts
from lorakit.generation import SamplingOptions
from lorakit.models import ModelConfig, load_model, load_tokenizer
from lorakit.models.positions import position_limit
from lorakit.models.vocab import check_token_ids
from lorakit.peft import load_adapter
from lorakit.train import out_dir

REQUIRED = frozenset({"model", "data", "out"})


@dataclass
class SourceOptions:
    """The model that answers, critiques and revises."""

    model: str = field(
        default="",
        metadata={
            "path": True,
            "help": "A causal LM and its tokenizer: a local directory, a hub id, or a .gguf "
            "file (as --model of lorakit sft).",
        },
    )
    adapter: str = field(
        default="",
        metadata={"path": True, "help": "An adapter directory to load onto the model (optional)."},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weights' dtype: auto keeps the checkpoint's."}
    )
    device: str = field(
        default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (cuda when available)."}
    )


@dataclass
class CritiqueOptions:
    """Prompts, principles, the loop and the outputs."""

    data: list[str] = field(
        default_factory=list,
        metadata={
            "path": True,
            "help": "Prompt files (JSONL / JSON / CSV / Parquet / datasets directory) with a "
            "'prompt' column or chat 'messages'.",
        },
    )
    principles: str = field(
        default="",
        metadata={
            "path": True,
            "help": "Principles file (YAML or JSON); empty: lorakit's default set.",
        },
    )
    out: str = field(
        default="",
        metadata={
            "path": True,
            "help": "Output directory (an existing run there with the same settings resumes).",
        },
    )
    revisions: int = field(
        default=1, metadata={"help": "Rounds of critique and revision per prompt."}
    )
    order: Literal["random", "round-robin"] = field(
        default="random",
        metadata={"help": "How each round's principle is picked: random (seeded) or round-robin."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the principle draws and sampling."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated for together."})
    judge: bool = field(
        default=False,
        metadata={
            "help": "Also ask the model which of the first response and the final revision "
            "better follows the last principle; record the normalised probabilities of its "
            "answers A / B as soft labels (p_chosen, p_rejected) in preferences.jsonl."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar over prompts."})

    def __post_init__(self) -> None:
        if self.revisions < 1:
            raise ValueError(f"revisions must be at least 1, got {self.revisions}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class ConstitutionalConfig:
    source: SourceOptions = field(default_factory=SourceOptions)
    critique: CritiqueOptions = field(default_factory=CritiqueOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)


def generate_data(
    generator: Generator,
    prompts: list[tuple[int, list[dict[str, str]]]],
    principles: list[Principle],
    config: ConstitutionalConfig,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Runs the loop over the ``(id, messages)`` prompts not yet done in ``--out``, appending
    each prompt's rows, and returns the summary."""
    options = config.critique
    outputs = Outputs(Path(options.out), settings)
    todo = [p for p in prompts if p[0] not in outputs.done]
    by_name = {p.name: p for p in principles}
    try:
        with tqdm(total=len(todo), desc="prompts", disable=not options.progress) as bar:
            for start in range(0, len(todo), options.batch_size):
                batch = todo[start : start + options.batch_size]
                # Seeded by the batch's first prompt, so a batch samples alike on resume.
                torch.manual_seed(options.seed * 1_000_003 + batch[0][0])
                began = time.perf_counter()
                records = critique_batch(
                    generator, batch, principles, options.revisions, options.order, options.seed
                )
                if options.judge:
                    judge_batch(generator, records, by_name)
                seconds = (time.perf_counter() - began) / len(batch)
                for record in records:
                    outputs.append(record, seconds)
                bar.update(len(batch))
    finally:
        outputs.close()
    return outputs.write_summary()


def run(config: ConstitutionalConfig) -> dict[str, Any]:
    """Loads the principles, the model's tokenizer and the prompts, and checks ``--out``
    (all before the model loads), then the model; checks that no prompt can lead past the
    model's positions, and runs :func:`generate_data`."""
    source, options = config.source, config.critique
    principles = load_principles(options.principles or DEFAULT)
    model_config = ModelConfig(model=source.model, dtype=source.dtype, device=source.device)
    tokenizer = load_tokenizer(model_config)
    prompts = [(i, as_messages(p.raw)) for i, p in enumerate(load_prompts(options.data, tokenizer))]
    settings = {
        "model": source.model,
        "adapter": source.adapter,
        "principles": [asdict(p) for p in principles],
        "revisions": options.revisions,
        "order": options.order,
        "seed": options.seed,
        "judge": options.judge,
        "sampling": asdict(config.sampling),
    }
    Outputs(Path(options.out), settings).close()  # a mismatched --out is refused before loading
    model = load_model(model_config)
    if source.adapter:
        load_adapter(model, source.adapter)
    generator = ModelGenerator(model, tokenizer, config.sampling, options.batch_size)
    texts = [m["content"] for _, messages in prompts for m in messages]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    check_token_ids(model, encoded, {"pad": generator.pad_id, "eos": generator.eos_id})
    shape = LoopShape(
        principles,
        options.revisions,
        options.order,
        options.seed,
        config.sampling.max_new_tokens,
        options.judge,
    )
    check_lengths(generator.count_tokens, prompts, shape, position_limit(model))
    return generate_data(generator, prompts, principles, config, settings)


def main(config: ConstitutionalConfig) -> str:
    """``lorakit constitutional``: what it prints when done."""
    with out_dir.claim(Path(config.critique.out)):  # one run per --out, as for training
        s = run(config)
    out = config.critique.out
    return (
        f"{s['prompts']} prompts, {s['prompts_changed']} revised to a different text; "
        f"{s['tokens_generated']} tokens in {s['seconds']:.0f} s\n"
        f"wrote {out}/sft.jsonl ({s['prompts']} rows), {out}/preferences.jsonl "
        f"({s['preference_pairs']} pairs), {out}/trace.jsonl, {out}/summary.json"
    )
