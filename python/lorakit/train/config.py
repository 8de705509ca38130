"""How to train: optimisation, schedule, evaluation, checkpoints, logging."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, get_args

from lorakit.validate import check_number

Schedule = Literal["cosine", "wsd", "constant"]


@dataclass
class TrainConfig:
    """Options of the :class:`~lorakit.train.Trainer` loop shared by every recipe."""

    out: str = field(
        default="lorakit-out",
        metadata={
            "path": True,
            "help": "Output directory: checkpoints, metrics.jsonl, loss.png, the result.",
        },
    )
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the training data (may be fractional)."}
    )
    max_steps: int = field(
        default=0, metadata={"help": "Stop after this many optimizer steps; 0: use epochs."}
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per micro-batch."})
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimizer step; the loss is averaged over all their "
            "trained tokens, as one batch of batch_size * grad_accum rows would be."
        },
    )
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    optim_bits: Literal[32, 8] = field(
        default=32,
        metadata={"help": "AdamW state precision: 32 (float32 moments) or 8 (blockwise 8-bit)."},
    )
    optim_page_budget_mb: float = field(
        default=0.0,
        metadata={
            "help": "Page AdamW's state of GPU parameters through pinned host memory so that it "
            "takes at most this many MB of GPU memory; 0: keep it all on the GPU. No effect on "
            "the CPU."
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the gradient's total 2-norm to this; 0: no clipping."}
    )
    schedule: Schedule = field(
        default="cosine",
        metadata={
            "help": "Learning-rate schedule: cosine (linear warmup, then cosine decay to 0), "
            "wsd (warmup 10%%, constant 80%%, linear decay to 0 over the last 10%%), constant "
            "(after warmup)."
        },
    )
    warmup: float = field(
        default=0.1,
        metadata={"help": "Warmup as a share of the steps (cosine and constant; wsd uses 10%%)."},
    )
    eval_every: int = field(
        default=0, metadata={"help": "Evaluate on the validation rows every N steps; 0: at end."}
    )
    patience: int = field(
        default=0,
        metadata={
            "help": "Stop early after this many evaluations without a lower validation loss; "
            "0: never."
        },
    )
    save_every: int = field(
        default=0, metadata={"help": "Write a checkpoint every N steps; 0: only at the end."}
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "How many of the latest checkpoints to keep."}
    )
    resume: bool = field(
        default=True,
        metadata={
            "help": "Continue from the latest checkpoint in out, if there is one (refused if an "
            "option that changes the result, or the rows the data files give, differ from the "
            "checkpoint's); --no-resume starts afresh and deletes out's checkpoints."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data order, dropout and init."})
    fused_ce: bool = field(
        default=True,
        metadata={
            "help": "Where the LM head is a plain linear layer, compute the loss and its gradient "
            "from the final hidden states a chunk of tokens at a time with lorakit's fused op, "
            "never the whole batch's logits; --no-fused-ce uses the model's logits."
        },
    )
    log_every: int = field(default=1, metadata={"help": "Write metrics every N steps."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    autocast: Literal["auto", "bf16", "off"] = field(
        default="auto",
        metadata={
            "help": "bf16 autocast of the forward passes (auto: where bf16 is native: a GPU "
            "that supports it, a CPU with AVX-512 BF16 or AMX; bf16: always; off: float32)."
        },
    )
    report_to: Literal["none", "tensorboard"] = field(
        default="none",
        metadata={
            "help": "Also write the metrics as TensorBoard scalars under out/tensorboard "
            "(metrics.jsonl and loss.png are always written)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass to save memory."},
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Under torchrun, shard the model over the ranks with FSDP2 (per decoder "
            "layer, the frozen NF4 base included) instead of replicating it with DDP; "
            "checkpoints are then written by every rank (torch.distributed.checkpoint). No "
            "effect in one process."
        },
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            check_number(name, getattr(self, name), integer=True, low=1)
        for name in ("max_steps", "eval_every", "patience", "save_every", "seed"):
            check_number(name, getattr(self, name), integer=True, low=0)
        for name in ("epochs", "weight_decay", "max_grad_norm", "optim_page_budget_mb"):
            check_number(name, getattr(self, name), low=0)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("warmup", self.warmup, low=0, high=1, high_open=True)
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        for name in ("optim_bits", "schedule", "autocast", "report_to"):
            choices = get_args(typing.get_type_hints(TrainConfig)[name])
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
