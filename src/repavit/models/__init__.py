"""RePa model families, registered in timm on import."""

from __future__ import annotations

import timm

from . import repamlpmixer, repapoolformer, repaswin, repavit  # noqa: F401  (register the models in timm)
from ._checkpoint import CheckpointMismatchError, load_checkpoint, read_checkpoint, unwrap_state_dict
from ._factory import create_model, reparameterize_model
from .repavit import RePaViT

# timm module names of the registered families (the file names under repavit/models/).
FAMILIES = ["repavit", "repaswin", "repapoolformer", "repamlpmixer"]


def list_models(pattern: str = "") -> list[str]:
    """Every registered RePa model name (authors' and timm-style), optionally filtered by a wildcard."""
    names: set[str] = set()
    for family in FAMILIES:
        names.update(timm.list_models(pattern or "*", module=family))
    return sorted(names)


__all__ = [
    "FAMILIES",
    "CheckpointMismatchError",
    "RePaViT",
    "create_model",
    "list_models",
    "load_checkpoint",
    "read_checkpoint",
    "reparameterize_model",
    "unwrap_state_dict",
]
