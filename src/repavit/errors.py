"""Errors a user can fix, and how the command line reports them.

:class:`UserError` is the one base class for user-facing errors: bad flags, files, data or
checkpoints. The CLI prints one of these as a single line on stderr (exit code 2); anything else is
a bug and keeps its traceback. It subclasses ``ValueError``, so Python callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["MissingExtraError", "UserError", "VerificationError"]


class UserError(ValueError):
    """An error the user can fix; the message is one line naming what was wrong and what was expected."""


class VerificationError(UserError, RuntimeError):
    """A result failed its own check (an export or a fold that does not reproduce the model); nothing was kept."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message says which extra to install."""
