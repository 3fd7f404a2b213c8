"""Building blocks shared by every RePa family. Never imports ``repavit.models``."""

from .attention import PreNormAttention
from .fold import BNStats, FoldedIdleFFN, fold_bn_before_linear, fold_idle_ffn
from .idle_conv_mlp import ChannelIdleConvMlp, FusedIdleConvMlp
from .idle_mlp import (
    ChannelIdleMlp,
    FusedIdleMlp,
    active_channels,
    idle_ratios_for_depth,
    reparameterize_module,
)

__all__ = [
    "BNStats",
    "ChannelIdleConvMlp",
    "ChannelIdleMlp",
    "FoldedIdleFFN",
    "FusedIdleConvMlp",
    "FusedIdleMlp",
    "PreNormAttention",
    "active_channels",
    "fold_bn_before_linear",
    "fold_idle_ffn",
    "idle_ratios_for_depth",
    "reparameterize_module",
]
