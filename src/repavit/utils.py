"""Small helpers every layer of the package may use (imports nothing of the package).

- :func:`atomic_write` / :func:`write_json`: the one way this package writes a file, so a killed
  or failing writer never leaves a half-written file under the real name.
- :func:`format_eta`: how progress lines print remaining time.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "format_eta", "parse_value", "write_json", "write_text"]

# The process's umask, read once at import (reading it means setting it, which must not happen
# while other threads write).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def format_eta(seconds: float) -> str:
    """``0:01:05`` for 65.3 seconds (negative values read as 0)."""
    return str(datetime.timedelta(seconds=max(int(seconds), 0)))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the result and rename it to ``path``; on any failure nothing is left.

    The temporary file (``.<name>.<random>.tmp``) sits in the target folder (same file system, so the
    rename is atomic) and gets the permissions a plain ``open`` would give.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 (and some writers replace the file: set it after)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` flag's value: YAML (``0.5``, ``true``, ``[8, 16]``), where an unbracketed
    comma list is a list (``8,16,24,32`` -> ``[8, 16, 24, 32]``); text that is not YAML stays text."""
    import yaml

    text = text.strip()
    if "," in text and not text.startswith(("[", "{", "'", '"')):
        text = f"[{text}]"
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
