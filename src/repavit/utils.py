"""Small helpers every layer of the package may use (imports nothing of the package)."""

from __future__ import annotations

import datetime

__all__ = ["format_eta"]


def format_eta(seconds: float) -> str:
    """``0:01:05`` for 65.3 seconds (negative values read as 0)."""
    return str(datetime.timedelta(seconds=max(int(seconds), 0)))
