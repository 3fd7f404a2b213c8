"""int8 dynamic quantization of a reparameterized model for CPU inference.

Every ``nn.Linear`` (the fused FFN's two projections, attention qkv/proj, the head) gets int8
weights and dynamically quantized activations (``torch.ao.quantization.quantize_dynamic``).

The fused FFN's ``W_lin`` holds the residual identity. Its diagonal (about 1) dwarfs the idle-path
entries (about 1e-2), so one int8 scale per tensor spends its range on the identity and rounds the
learned part coarsely. With ``keep_identity_separate=True`` (default) the identity stays an exact
float add and only ``W_lin - I`` is quantized; the benchmark measures both.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .errors import UserError
from .layers.idle_mlp import FusedIdleMlp


def quantize_int8(model: nn.Module, keep_identity_separate: bool = True, inplace: bool = False) -> nn.Module:
    """Return an int8 dynamically quantized copy of a reparameterized model (CPU)."""
    if any(m.__class__.__name__ == "ChannelIdleMlp" for m in model.modules()):
        raise UserError("quantize_int8 expects a reparameterized model; call repavit.reparameterize_model first")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if keep_identity_separate:
        for m in model.modules():
            if isinstance(m, FusedIdleMlp):
                m.separate_identity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
