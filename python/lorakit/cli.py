"""The ``lorakit`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorakit.demo import DemoConfig


def _demo(args: argparse.Namespace) -> int:
    from lorakit import demo

    config = DemoConfig(
        hidden=args.hidden, layers=args.layers, blocksize=args.blocksize,
        double_quant=not args.no_double_quant,
    )  # fmt: skip
    print(demo.format_report(config, demo.run(config, progress=not args.quiet)))
    return 0


def _info(args: argparse.Namespace) -> int:
    import lorakit

    for field, value in vars(lorakit.build_info()).items():
        print(f"{field}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="NF4-quantize a small Llama built from a config and report its memory"
    )
    defaults = DemoConfig()
    demo.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden size")
    demo.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers")
    demo.add_argument(
        "--blocksize", type=int, default=defaults.blocksize, help="values per NF4 scale"
    )
    demo.add_argument("--no-double-quant", action="store_true", help="keep the scales in float32")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    info = commands.add_parser("info", help="print how lorakit was built")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError) as e:  # user mistakes get one line, not a traceback
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
