"""The ``lorakit`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorakit.config_args import add_arguments, build

# Options that have no useful default.
REQUIRED = {"model", "data"}


def _quiet() -> None:
    """No progress bars from the libraries underneath either (loading weights, reading data)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _demo(args: argparse.Namespace) -> int:
    from lorakit import demo

    config = build(demo.DemoConfig, args, set(), {})
    if not config.progress:
        _quiet()
    report = demo.run(config)
    print(demo.format_report(report))
    return 0


def _recipe(args: argparse.Namespace) -> int:
    from lorakit.train import distributed, recipe

    # Continued pre-training trains on every token of plain text.
    overrides = {"format": "text"} if args.command == "pretrain" else {}
    config = build(recipe.RunConfig, args, REQUIRED, overrides)
    # Under torchrun every worker runs this; they join one process group for the run.
    with distributed.process_group():
        if not (config.train.progress and distributed.is_main()):
            _quiet()
        result = recipe.run(config)
        if not distributed.is_main():
            return 0
    share = result.trainable / max(1, result.total)
    trained = result.train
    best = trained.best_val_loss
    print(
        f"trained {trained.steps} steps in {trained.seconds:.0f} s; last loss "
        f"{trained.last_loss:.4f}" + ("" if best is None else f"; best validation loss {best:.4f}")
    )
    print(f"trainable parameters: {result.trainable:,} of {result.total:,} ({share:.2%})")
    print(f"saved {result.saved}; metrics {result.train.metrics}; loss curve {result.train.plot}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from lorakit.train import compare

    config = build(compare.CompareConfig, args, set(), {})
    if not config.progress:
        _quiet()
    result = compare.run(config)
    print(compare.format_table(result.rows))
    print(f"table {result.table}; data {result.data}; chart {result.chart}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lorakit.train import merge_run

    config = build(merge_run.MergeConfig, args, merge_run.REQUIRED, {})
    _quiet()
    out = merge_run.run(config)
    print(f"merged model and tokenizer written to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import lorakit

    for field, value in vars(lorakit.build_info()).items():
        print(f"{field}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lorakit.demo import DemoConfig
    from lorakit.train import merge_run
    from lorakit.train.compare import CompareConfig
    from lorakit.train.recipe import RunConfig

    parser = argparse.ArgumentParser(prog="lorakit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="pre-train a tiny Llama on invented facts, QLoRA-SFT it, test it on held-out facts",
    )
    add_arguments(demo, DemoConfig, set())
    demo.set_defaults(run=_demo)

    for name, text in [
        ("sft", "supervised fine-tuning (chat, alpaca, prompt/completion data)"),
        ("pretrain", "continued pre-training on plain text (every token trained on)"),
    ]:
        sub = commands.add_parser(name, help=text, description=text)
        add_arguments(sub, RunConfig, REQUIRED)
        sub.set_defaults(run=_recipe)

    text = "fine-tune one small model on one task with every method; tabulate cost and loss"
    compare = commands.add_parser("compare", help=text, description=text)
    add_arguments(compare, CompareConfig, set())
    compare.set_defaults(run=_compare)

    text = (
        "merge a LoRA or IA3 adapter into its base model; write a plain Hugging Face model "
        "directory (+ tokenizer). A QLoRA adapter merges into the dense base checkpoint it was "
        "trained from (its base_model_name_or_path), not into NF4 weights."
    )
    merge = commands.add_parser("merge", help=text.split(";")[0], description=text)
    add_arguments(merge, merge_run.MergeConfig, merge_run.REQUIRED)
    merge.set_defaults(run=_merge)

    info = commands.add_parser("info", help="print how lorakit was built")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError) as e:  # user mistakes get one line, no traceback
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
