"""What a deployment consumer needs to know about a model: input size, preprocessing, size in bytes.

Exports carry the model record (:class:`repavit.models.ModelRecord`) beside these, in the file
(ONNX ``metadata_props``, TorchScript extra files) and in a JSON sidecar ``<file>.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..models import ModelRecord
from ..utils import write_json

__all__ = ["eval_transform", "input_size_of", "preprocessing", "tensor_bytes", "write_sidecar"]


def tensor_bytes(state: nn.Module | Mapping[str, Tensor]) -> int:
    """Bytes of all tensors of a state dict (or of ``module.state_dict()``)."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    return sum(t.numel() * t.element_size() for t in sd.values() if isinstance(t, Tensor))


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model takes: its real image size, not just its ``pretrained_cfg`` default."""
    try:
        from timm.models._input import get_model_input_config

        size = get_model_input_config(model).get("input_size")
        if size:
            return tuple(int(s) for s in size)
    except (ImportError, AttributeError, KeyError, TypeError):
        pass
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c = cfg.get("input_size", (3, 224, 224))[0]
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        return (c, *(tuple(img) if isinstance(img, (tuple, list)) else (img, img)))
    return tuple(cfg.get("input_size", (3, 224, 224)))


def eval_transform(model: nn.Module):
    """timm's evaluation transform for ``model`` (PIL image -> tensor): its data config (mean, std,
    interpolation, crop) at the size the model really takes, even when ``img_size`` was overridden."""
    from timm.data import create_transform, resolve_model_data_config

    data_cfg = resolve_model_data_config(model)
    data_cfg["input_size"] = input_size_of(model)
    return create_transform(**data_cfg, is_training=False)


def preprocessing(model: nn.Module, size: tuple[int, ...] | None = None) -> dict[str, Any]:
    """How images must be prepared for ``model``: size, mean/std, interpolation, crop (its ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    keys = ("architecture", "mean", "std", "interpolation", "crop_pct", "crop_mode", "num_classes")
    out = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    out["input_size"] = list(size or input_size_of(model))
    if hasattr(model, "num_classes"):
        out["num_classes"] = model.num_classes
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def write_sidecar(path: str | os.PathLike, model: nn.Module, record: ModelRecord, **extra: Any) -> Path:
    """Write ``<path>.json`` beside an exported file: the model record, preprocessing and ``extra``."""
    path = Path(path)
    data = {"file": path.name, "record": record.to_dict(), "preprocessing": preprocessing(model), **extra}
    return write_json(path.with_name(path.name + ".json"), data)
