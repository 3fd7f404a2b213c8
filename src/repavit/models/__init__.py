"""RePa model families, registered in timm on import, and the checkpoint formats they read and write."""

from __future__ import annotations

import timm

from . import repalvvit, repamlpmixer, repapoolformer, repaswin, repavit  # noqa: F401  (register the models in timm)
from ._pretrained import ReleasedWeights
from .checkpoint import (
    Checkpoint,
    load_checkpoint,
    open_checkpoint,
    read_checkpoint,
    save_checkpoint,
    state_form,
    unwrap_state_dict,
)
from .loading import (
    LoadedModel,
    Settings,
    create_model,
    fold_refusal,
    foldable,
    load_model,
    reparameterize_model,
    resolve_settings,
)
from .record import CheckpointMismatchError, ModelRecord, model_args_of, record_of
from .repavit import RePaViT

# timm module names of the registered families (the file names under repavit/models/).
FAMILIES = ["repavit", "repaswin", "repapoolformer", "repamlpmixer", "repalvvit"]


def list_models(pattern: str = "") -> list[str]:
    """Every registered RePa model name (authors' and timm-style), optionally filtered by a wildcard."""
    names: set[str] = set()
    for family in FAMILIES:
        names.update(timm.list_models(pattern or "*", module=family))
    return sorted(names)


def is_repa_model(name: str) -> bool:
    """True for a registered RePa model name (with or without a pretrained tag); False for vanilla LV-ViT."""
    base = name.split(".")[0]
    return base in set(list_models()) and base not in repalvvit.VANILLA_NAMES


__all__ = [
    "FAMILIES",
    "Checkpoint",
    "CheckpointMismatchError",
    "LoadedModel",
    "ModelRecord",
    "RePaViT",
    "ReleasedWeights",
    "Settings",
    "create_model",
    "fold_refusal",
    "foldable",
    "is_repa_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_args_of",
    "open_checkpoint",
    "read_checkpoint",
    "record_of",
    "reparameterize_model",
    "resolve_settings",
    "save_checkpoint",
    "state_form",
    "unwrap_state_dict",
]
