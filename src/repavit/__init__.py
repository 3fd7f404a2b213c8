"""repavit: RePaViT (ICML 2025) models with exact structural reparameterization.

Importing the package registers every RePa model in timm::

    import repavit, timm
    model = timm.create_model("RePaViT_Base", idle_ratio=0.75, feature_norm="BatchNorm")
    fast = repavit.reparameterize_model(model.eval())
"""

from .layers import ChannelIdleMlp, FusedIdleMlp
from .models import (
    CheckpointMismatchError,
    RePaViT,
    create_model,
    list_models,
    load_checkpoint,
    read_checkpoint,
    reparameterize_model,
)

__version__ = "0.1.0"

__all__ = [
    "ChannelIdleMlp",
    "CheckpointMismatchError",
    "FusedIdleMlp",
    "RePaViT",
    "create_model",
    "list_models",
    "load_checkpoint",
    "read_checkpoint",
    "reparameterize_model",
]
