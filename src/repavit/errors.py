"""Errors a user can fix, and how the command line reports them.

:class:`UserError` is the one base class for user-facing errors: bad flags, files, data or
checkpoints. The CLI prints one of these as a single line on stderr (exit code 2); anything else is
a bug and keeps its traceback. It subclasses ``ValueError``, so Python callers that catch
``ValueError`` keep working.

:class:`ArgumentError` names arguments without knowing whether they came from Python or a flag:
library code raises it, and each front end renders the names in its own spelling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ArgumentError", "MissingExtraError", "UserError", "VerificationError", "python_name"]


class UserError(ValueError):
    """An error the user can fix; the message is one line naming what was wrong and what was expected."""


class VerificationError(UserError, RuntimeError):
    """A result failed its own check (an export or a fold that does not reproduce the model); nothing was kept."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


class _Names(dict):
    """``str.format_map`` mapping: given values as they are, every other field as an argument name."""

    def __init__(self, name: Callable[[str], str], values: dict[str, Any]) -> None:
        super().__init__(values)
        self._name = name

    def __missing__(self, key: str) -> str:
        return self._name(key)


def python_name(key: str) -> str:
    """How the Python API names an argument in messages: as it is (``data_path``)."""
    return key


class ArgumentError(UserError):
    """A bad argument (a value or a combination), named the way the caller spells its arguments.

    The message is a template whose fields are argument names, plus values given as keywords::

        ArgumentError("{data_path} is not a folder: {path}", path=p)

    ``str(e)`` names arguments as the Python API does (``data_path is not a folder: ...``); the
    command line renders it with its flags (``e.render(lambda k: "--" + k)``: ``--data_path ...``).
    So library code never names a flag, and every front end gets its own spelling.
    """

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = python_name) -> str:
        return self.template.format_map(_Names(name, self.values))
