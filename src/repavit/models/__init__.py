"""RePa model families, registered in timm on import."""

from . import repavit  # noqa: F401  (registers the RePaViT models)
from ._checkpoint import CheckpointMismatchError, load_checkpoint, read_checkpoint, unwrap_state_dict
from ._factory import create_model, reparameterize_model
from .repavit import RePaViT

__all__ = [
    "CheckpointMismatchError",
    "RePaViT",
    "create_model",
    "load_checkpoint",
    "read_checkpoint",
    "reparameterize_model",
    "unwrap_state_dict",
]
