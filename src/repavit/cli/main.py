"""``repavit`` console entry point: one parser, one subcommand module per command.

Each module in :data:`COMMANDS` defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Errors the user can fix are one line on stderr with exit code 2; anything
else is a bug and keeps its traceback (see :mod:`repavit.cli._run`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._run import Parser, add_spelling_aliases, run_command

# Subcommand modules under repavit.cli, in the order `repavit --help` lists them.
COMMANDS = [
    "bench",
    "train",
    "detect",
    "segment",
    "convert",
    "reparam",
    "export",
    "push_to_hub",
    "predict",
    "rocksdb",
    "bench_data",
    "label",
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="repavit", description="RePaViT models, reparameterization and tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"repavit.cli.{name}").register(sub)
    return add_spelling_aliases(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"repavit {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
