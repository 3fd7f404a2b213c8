"""``repavit`` console entry point: one parser, one subcommand module per command.

Each module in :data:`COMMANDS` defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Errors the user can fix (bad paths, mismatched checkpoints, bad values)
are printed as one line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Subcommand modules under repavit.cli, in the order `repavit --help` lists them.
COMMANDS = ["bench", "train", "convert", "reparam", "export", "push_to_hub", "predict", "rocksdb", "bench_data"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repavit", description="RePaViT models, reparameterization and tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"repavit.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"repavit {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
