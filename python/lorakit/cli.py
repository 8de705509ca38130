"""The ``lorakit`` command: one subcommand per entry of :data:`lorakit.recipes.registry.COMMANDS`,
its options generated from the entry's config dataclass."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from lorakit.config_args import add_arguments, build

DESCRIPTION = "Fine-tune language models: LoRA, QLoRA, IA3, adapters and prefixes, SFT to RLHF."
EPILOG = (
    "Each command has its own options: lorakit <command> --help. Options also come from a YAML "
    "file (--config), and the command line overrides it. Start with: lorakit demo"
)


def _quiet() -> None:
    """No progress bars from the libraries underneath either (loading weights, reading data)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _shows_progress(config: Any) -> bool:
    return bool(getattr(getattr(config, "train", config), "progress", False))


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a mistake on the command line is one line that says where the
    usage is, instead of the usage itself (forty lines for a command with many options) above
    the message. Subcommands' parsers are of this class too (add_subparsers uses the parent's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # argparse reports them from the top parser; they are the command's options.
            command = getattr(parsed, "command", None)
            where = self if command is None else _Parser(prog=f"{self.prog} {command}")
            where.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    from lorakit.recipes.registry import COMMANDS

    parser = _Parser(prog="lorakit", description=DESCRIPTION, epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name, help=command.help, description=command.description or command.help
        )
        add_arguments(sub, command.config, set(command.required))
    return parser


def _run(name: str, args: argparse.Namespace) -> str:
    from lorakit._native import cpu_isa
    from lorakit.recipes.registry import COMMANDS
    from lorakit.train import distributed

    # A LORAKIT_CPU_ISA the kernels refuse is refused now: a run that calls no kernel (LoRA on
    # the CPU) would otherwise ignore the setting silently.
    cpu_isa()
    command = COMMANDS[name]
    config = build(command.config, args, set(command.required), {})
    if not command.distributed:
        if not _shows_progress(config):
            _quiet()
        return command.run(config)
    # Under torchrun every worker runs this; they join one process group for the run.
    with distributed.process_group():
        if not (_shows_progress(config) and distributed.is_main()):
            _quiet()
        return command.run(config)


def _one_line(error: BaseException) -> str:
    """The message on one line (libraries' messages may span several)."""
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = _run(args.command, args)
    except (ValueError, RuntimeError, OSError) as e:  # user mistakes get one line, no traceback
        print(f"lorakit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: the shell's convention is 128 + SIGINT
        print(f"lorakit {args.command}: {_one_line(e) or 'interrupted'}", file=sys.stderr)
        return 130
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
