"""``repavit train | eval | speed``, and the seed-compatible front of the root ``main.py``.

The flags are the authors' ``main.py`` flags with the same spellings and meanings (``--batch_size``,
``--channel_idle``, ``--eval``, ``--test_speed``, ...); each also has a dashed alias (``--batch-size``).
``--config FILE.yaml`` supplies settings that flags given on the command line override. Without a
subcommand (``main.py``), ``--eval`` evaluates, ``--test_speed`` measures speed, anything else trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from ..train.config import GROUPS, TrainConfig, config_fields, load_yaml
from ..utils import parse_value
from ._run import Parser, add_spelling_aliases, run_command, seed_flag

__all__ = ["add_config_arguments", "build_seed_parser", "config_from_args", "register", "run", "seed_main"]

_MODES = {
    "train": ("train a model (DeiT recipe); --eval / --test_speed switch mode like the authors' main.py", None),
    "eval": ("evaluate a checkpoint: top-1/top-5 (same as train --eval)", "eval"),
    "speed": ("measure inference throughput, no dataset needed (same as train --test_speed)", "test_speed"),
}


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def _spellings(name: str) -> list[str]:
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    return flags


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per :class:`TrainConfig` field (defaults suppressed, see module doc)."""
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="YAML", help="YAML file of settings")
    groups = {g: parser.add_argument_group(f"{g} options") for g in GROUPS}
    hints = typing.get_type_hints(TrainConfig)
    for f in config_fields():
        meta = f.metadata
        g = groups[meta["group"]]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        help_text = f"{meta['help']} (default: {default})"
        flags = _spellings(f.name) + [a for alias in meta.get("aliases", ()) for a in _spellings(alias[2:])]
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        origin = typing.get_origin(base) or base
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if origin is bool:
            g.add_argument(*flags, action="store_true", **kw)
            if default or meta.get("negatable"):
                no_help = f"turn off --{f.name}"
                g.add_argument(
                    *_spellings(f"no_{f.name}"),
                    action="store_false",
                    dest=f.name,
                    default=argparse.SUPPRESS,
                    help=no_help,
                )
        elif origin is list:
            g.add_argument(*flags, nargs="+", type=float, metavar="X", **kw)
        elif origin is dict:
            g.add_argument(*flags, nargs="+", action="extend", type=_key_value, metavar="KEY=VALUE", **kw)
        else:
            choices = meta.get("choices")
            g.add_argument(*flags, type=origin, choices=choices, metavar=None if choices else f.name.upper(), **kw)


def config_from_args(args: argparse.Namespace, mode: str | None = None) -> TrainConfig:
    """Defaults < ``--config`` YAML < flags on the command line; ``mode`` forces eval or speed."""
    names = {f.name for f in config_fields()}
    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    source = getattr(args, "config", None) or "command line"
    given = {k: v for k, v in vars(args).items() if k in names}
    if "model_kwargs" in given and isinstance(given["model_kwargs"], list):
        given["model_kwargs"] = {**values.get("model_kwargs", {}), **dict(given["model_kwargs"])}
    values.update(given)
    if mode == "eval":
        values["eval"] = True
    elif mode == "test_speed":
        values["test_speed"] = True
    return TrainConfig.from_dict(values, source=source)


def register(sub: argparse._SubParsersAction) -> None:
    for name, (help_text, mode) in _MODES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(p)
        p.set_defaults(func=run, _mode=mode, _flag_name=seed_flag)


def run(args: argparse.Namespace) -> int:
    from ..train.fit import run as run_config

    cfg = config_from_args(args, getattr(args, "_mode", None))
    result = run_config(cfg)
    stopped = result.get("stopped") if isinstance(result, dict) else None
    return 128 + int(stopped["signum"]) if stopped else 0  # like a process ended by the signal, but saved


def build_seed_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="main.py",
        description="RePaViT training, evaluation (--eval) and speed test (--test_speed), seed-compatible flags.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; show tracebacks")
    add_config_arguments(p)
    p.set_defaults(_flag_name=seed_flag)
    return add_spelling_aliases(p)


def seed_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the root ``main.py`` (``torchrun --nproc_per_node=N main.py --model=... ``)."""
    args = build_seed_parser().parse_args(argv)
    return run_command("main.py", run, args)
