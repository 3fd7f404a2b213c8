"""Reference structures for side-by-side timing (reimplemented from the paper's description).

- :class:`ThreeLinearMlp`: the authors' inference FFN design, three separate ``nn.Linear`` layers
  summed: ``fc3(GELU(fc2(x))) + fc1(x)`` with the identity folded into ``fc1``.
- :class:`MaskedIdleMlp`: the authors' training-form design: BatchNorm1d on the transposed
  ``(B, C, N)`` tensor, GELU on every hidden channel, then a full-size boolean mask selects
  ``torch.where(mask, GELU(z), z)``.

Both share weights with our modules, so outputs agree and only the structure is timed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.idle_mlp import ChannelIdleMlp, FusedIdleMlp


class ThreeLinearMlp(nn.Module):
    """``fc3(GELU(fc2(x))) + fc1(x)``: one C x C, one C x a, one a x C linear layer."""

    def __init__(self, fused: FusedIdleMlp) -> None:
        super().__init__()
        c, a = fused.dim, fused.act_dim
        w, b = fused.in_proj.weight.detach(), fused.in_proj.bias.detach()
        if not fused.has_linear:  # nothing idles: the authors keep the residual as an identity matrix
            w = torch.cat((torch.eye(c).to(w), w))
            b = torch.cat((fused.out_proj.bias.detach(), b))
        self.fc1 = nn.Linear(c, c).to(w)
        self.fc1.weight.data.copy_(w[:c])
        self.fc1.bias.data.copy_(b[:c])
        self.fc2 = self.fc3 = None
        if a:
            self.fc2 = nn.Linear(c, a).to(w)
            self.fc2.weight.data.copy_(w[c:])
            self.fc2.bias.data.copy_(b[c:])
            self.fc3 = nn.Linear(a, c, bias=False).to(w)
            self.fc3.weight.data.copy_(fused.out_proj.weight.detach())

    def forward(self, x: Tensor) -> Tensor:
        if self.fc2 is None:
            return self.fc1(x)
        return self.fc3(F.gelu(self.fc2(x))) + self.fc1(x)


class MaskedIdleMlp(nn.Module):
    """The authors' training form: transposed BatchNorm, GELU everywhere, full-size mask per forward."""

    def __init__(self, ours: ChannelIdleMlp) -> None:
        super().__init__()
        self.m = copy.deepcopy(ours)
        self.act_dim = ours.act_dim

    def forward(self, x: Tensor) -> Tensor:
        m = self.m
        u = m.norm1(x.transpose(1, 2)).transpose(1, 2)  # (B, N, C) via (B, C, N)
        z = m.fc1(u)
        mask = torch.zeros_like(z, dtype=torch.bool)
        mask[..., : self.act_dim] = True
        z = torch.where(mask, F.gelu(z), z)
        z = m.norm2(z.transpose(1, 2)).transpose(1, 2)
        return x + m.drop_path(m.fc2(z))


def _swap(model: nn.Module, cls: type[nn.Module], make) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, cls):
                setattr(module, child_name, make(child))
        del name
    return model


def with_three_linear_ffn(fused_model: nn.Module) -> nn.Module:
    """A copy of a reparameterized model whose FFNs use the three-linear reference structure."""
    return _swap(fused_model, FusedIdleMlp, ThreeLinearMlp)


def with_masked_ffn(model: nn.Module) -> nn.Module:
    """A copy of a training-form model whose FFNs use the authors' masked training structure."""
    return _swap(model, ChannelIdleMlp, MaskedIdleMlp)
