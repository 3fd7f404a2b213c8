"""Reading checkpoints safely and loading them into RePa models.

Files are read with ``torch.load(weights_only=True)`` (plus a short allow-list of harmless types,
e.g. the ``argparse.Namespace`` the authors' training checkpoints pickle under ``args``) or with
safetensors. Nothing here can execute code from a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

_logger = logging.getLogger(__name__)

# Types that a weights-only unpickler may rebuild: plain containers of values, nothing callable.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message names the setting that differs."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.pth``/``.pt``/``.bin`` (weights-only unpickling) or ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(_refusal(path, e)) from None


def _refusal(path: str, err: Exception) -> str:
    """One line: what weights-only loading refused in ``path`` (nothing in it ran) and how to get the weights out."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"(Unsupported operand \d+)", text)
    what = f"`{found.group(1)}`" if found else "pickled objects"
    return (
        f"refusing to unpickle {path}: it needs {what}, which is not a tensor or plain value, and weights-only "
        "loading never rebuilds such objects (nothing from the file was run). If you trust the file, keep only "
        "its weights: torch.save({'model': torch.load(PATH, weights_only=False)['model']}, 'weights.pth'), "
        "then use weights.pth (e.g. `repavit convert weights.pth`)"
    )


def unwrap_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> dict[str, Tensor]:
    """Return the model state dict from a raw state dict or a training checkpoint.

    Accepts ``{"model": sd}``, ``{"model_ema": sd}``, ``{"state_dict": sd}`` or a bare state dict,
    and strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    sd: Any = checkpoint
    if use_ema:
        if not (isinstance(sd, Mapping) and isinstance(sd.get("model_ema"), Mapping)):
            raise CheckpointMismatchError("use_ema=True but the checkpoint has no 'model_ema' entry")
        sd = sd["model_ema"]
    for key in _WRAPPER_KEYS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError("checkpoint holds no state dict of tensors (expected a dict of tensors, or one under 'model')")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    use_ema: bool = False,
) -> nn.Module:
    """Load a checkpoint file or dict into ``model`` (in place), through the model's key filter.

    The authors' layouts (training form and their reparameterized ``fc1/fc2/fc3``) and ours are
    accepted. A checkpoint for another configuration raises :class:`CheckpointMismatchError`.
    """
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    sd = unwrap_state_dict(raw, use_ema=use_ema)
    filter_fn = getattr(model, "checkpoint_filter", None)
    if filter_fn is not None:
        sd = filter_fn(sd)
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointMismatchError(
                f"checkpoint tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}"
                + (" (a different number of classes: pass num_classes to match)" if k.startswith("head.") else "")
            )
    if strict:
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
            raise CheckpointMismatchError(f"checkpoint keys do not match {type(model).__name__}: {'; '.join(parts)}")
    result = model.load_state_dict(sd, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        _logger.warning("missing keys %s, unexpected keys %s", result.missing_keys, result.unexpected_keys)
    return model
