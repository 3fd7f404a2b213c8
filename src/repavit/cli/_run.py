"""How every command starts and ends: the argument parser, and the one error handler.

User errors (:class:`repavit.errors.UserError`, argparse errors, and the file-system errors a user
causes: a missing file, a folder that is a file, no permission, a full disk) print one line on
stderr and exit with code 2. Ctrl-C outside training prints one line and exits with 130. Anything
else is a bug: it keeps its traceback (out-of-memory errors add one hint line).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable

from ..errors import ArgumentError, UserError

__all__ = ["Parser", "add_spelling_aliases", "dashed_flag", "run_command", "seed_flag"]

# File-system errors that come from what the user asked for (paths, permissions, space), not from bugs.
USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is printed by ``--help`` only)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# Python argument names whose flag is another word (the Python API's model_name is --model everywhere).
_RENAMED = {"model_name": "model"}
_SEED_RENAMED = {**_RENAMED, "img_size": "input_size", "num_classes": "nb_classes"}


def dashed_flag(key: str) -> str:
    """How most subcommands spell an argument in messages: ``idle_ratio`` -> ``--idle-ratio``."""
    return "--" + _RENAMED.get(key, key).replace("_", "-")


def seed_flag(key: str) -> str:
    """How train/eval/speed and ``main.py`` spell it: the authors' underscores (``--idle_ratio``)."""
    return "--" + _SEED_RENAMED.get(key, key)


def add_spelling_aliases(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every ``--long-option`` its other spelling (``--idle-ratio`` <-> ``--idle_ratio``), in every subcommand.

    One vocabulary: the seed README's underscore flags and the dash spellings work everywhere, with the
    same meaning. The parser and its sub-parsers are changed in place; returns ``parser``.
    """
    for action in parser._actions:
        for opt in list(action.option_strings):
            if not opt.startswith("--"):
                continue
            body = opt[2:]
            for other in ("--" + body.replace("-", "_"), "--" + body.replace("_", "-")):
                if other != opt and other not in parser._option_string_actions:
                    action.option_strings.append(other)
                    parser._option_string_actions[other] = action
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                add_spelling_aliases(sub)
    return parser


def _os_message(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        return f"{e.strerror.lower()}: {target}"
    return str(e) or type(e).__name__


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def run_command(prog: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run ``func(args)`` with logging set up; map user errors to one line and exit code 2.

    An :class:`~repavit.errors.ArgumentError` names its arguments with ``args._flag_name`` (a
    subcommand's spelling, :func:`dashed_flag` unless it sets another), so a library message
    reads as flags on the command line.
    """
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    try:
        return int(func(args) or 0)
    except UserError as e:
        if verbose:
            raise
        text = e.render(getattr(args, "_flag_name", dashed_flag)) if isinstance(e, ArgumentError) else str(e)
        msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        if not (isinstance(e, USER_OS_ERRORS) or e.errno in _USER_ERRNOS) or verbose:
            raise
        print(f"{prog}: error: {_os_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        if _is_out_of_memory(e):
            print(f"{prog}: out of memory: lower --batch_size (or --speed_batch_size / --batch-size)", file=sys.stderr)
        raise
