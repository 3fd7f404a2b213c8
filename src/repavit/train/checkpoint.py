"""Training checkpoints: plain dicts of tensors and values, written atomically, read with ``weights_only=True``.

Layout (a superset of the authors' keys, minus their pickled ``args`` Namespace)::

    {"model": state_dict, "model_ema": state_dict | None, "optimizer": ..., "lr_scheduler": ...,
     "scaler": ... | None, "epoch": int, "max_accuracy": float, "config": {flag: value},
     "model_name": str, "model_kwargs": {...}, "format": "repavit-train-v1"}

``epoch`` is the last finished epoch (0-based), as in the authors' files, so training resumes at
``epoch + 1``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from ..models._checkpoint import read_checkpoint

__all__ = ["FORMAT", "check_plain", "load_training_checkpoint", "save_checkpoint"]

_logger = logging.getLogger(__name__)
FORMAT = "repavit-train-v1"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` if ``obj`` holds anything but tensors, numbers, strings, None, lists/tuples, dicts."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a non-plain key {k!r}")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} holds a {type(obj).__name__}, which weights_only loading would refuse")


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    Call it on the main process only. A crash mid-write leaves the previous file intact.
    """
    path = os.fspath(path)
    check_plain(state)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _logger.debug("saved %s", path)


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (ours or the authors') with ``weights_only=True``; return the raw dict."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} does not hold a checkpoint dictionary")
    return ckpt
