"""Channels-first (NCHW) channel-idle FFN with layer scale, for convolutional backbones (PoolFormer).

Training form, feature maps ``x`` of shape ``(B, C, H, W)``::

    u = BN1(x)                      # BatchNorm2d: statistics over B*H*W
    z = fc1(u)                      # 1x1 conv, C -> h
    z[:, :a] = GELU(z[:, :a])       # the other h - a channels idle
    y = fc2(BN2(z))                 # 1x1 conv, h -> C
    out = x + drop_path(ls * y)     # per-channel layer scale ``ls`` on the whole branch

The fold (:func:`repavit.layers.fold.fold_idle_ffn` with ``layer_scale``) scales fc2's weight *and*
its bias by ``ls``; the authors' PoolFormer fold scales only the weight, which shifts every output
by ``(ls - 1) * b_out``, an O(1) error. Inference form (:class:`FusedIdleConvMlp`)::

    out = W_lin x + b_lin + W_out GELU(W_act x + b_act)      (1x1 convolutions)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from ..errors import UserError
from .fold import BNStats, FoldedIdleFFN, fold_idle_ffn
from .idle_covariance import covariance_applies, covariance_hidden
from .idle_mlp import (
    PartialActivation,
    active_channels,
    channel_group_batch_norm,
    check_feature_norm,
    check_hidden_path,
    check_idle_ratio,
    layernorm_fold_error,
)

__all__ = ["ChannelIdleConvMlp", "FusedIdleConvMlp"]


class ChannelIdleConvMlp(PartialActivation, nn.Module):
    """Channel-idle FFN on NCHW maps (1x1 convs, BatchNorm2d), with layer scale and its residual.

    Args:
        dim: input/output channels ``C``.
        hidden_dim: hidden channels ``h``.
        idle_ratio: share of hidden channels that skip the activation.
        channel_idle: if False, every hidden channel is activated (plain FFN).
        feature_norm: ``"BatchNorm"`` (reparameterizable) or ``"LayerNorm"`` (per-pixel LayerNorm over
            channels, no BN2; not foldable).
        drop_path: stochastic depth rate on the FFN branch.
        layer_scale_init_value: initial value of the per-channel scale ``ls``; None for no layer scale.
        rounding: ``"floor"`` (PoolFormer's ``int(h * (1 - idle_ratio))``) or ``"ceil"``.
        act_layer: activation module class (exact GELU by default).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        idle_ratio: float = 0.75,
        channel_idle: bool = True,
        feature_norm: str = "BatchNorm",
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-5,
        rounding: str = "floor",
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        check_feature_norm(feature_norm)
        self.dim, self.hidden_dim = dim, hidden_dim
        self.feature_norm = feature_norm
        self.idle_ratio = check_idle_ratio(idle_ratio) if channel_idle else 0.0
        self.rounding = rounding
        self.act_dim = active_channels(hidden_dim, self.idle_ratio, rounding) if channel_idle else hidden_dim
        # Registration order follows the authors' state_dict order (ls, fc1, fc2, norm1, norm2).
        if layer_scale_init_value is not None:
            self.ls = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.ls = None
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        if feature_norm == "BatchNorm":
            self.norm1: nn.Module = nn.BatchNorm2d(dim)
            self.norm2: nn.Module = nn.BatchNorm2d(hidden_dim)
        else:
            self.norm1 = LayerNorm2d(dim)
            self.norm2 = nn.Identity()
        self.act = act_layer()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    # How the hidden layer runs in training: "auto" (the covariance path where it pays), "covariance", "split"
    hidden_path: str = "auto"

    def extra_repr(self) -> str:
        return f"act_dim={self.act_dim}/{self.hidden_dim}, feature_norm={self.feature_norm}"

    def forward(self, x: Tensor) -> Tensor:
        u = self.norm1(x)
        if torch.jit.is_scripting():  # compiled alone: the eager branch below is not
            y = self.fc2(self.norm2(self._partial_act(self.fc1(u))))
        elif self._split_norm2():
            y = self._hidden(u)
        else:  # LayerNorm form, nothing / everything idle, a converted norm (e.g. SyncBatchNorm), TorchScript
            y = self.fc2(self.norm2(self._partial_act(self.fc1(u))))  # (B, C, H, W)
        if self.ls is not None:
            y = y * self.ls[:, None, None]
        return x + self.drop_path(y)

    def _split_norm2(self) -> bool:
        """Whether the two channel groups can be normalized apart (a plain BatchNorm2d over partly idle channels)."""
        return 0 < self.act_dim < self.hidden_dim and type(self.norm2) is nn.BatchNorm2d

    @torch.jit.unused
    def _hidden(self, u: Tensor) -> Tensor:
        """The hidden layer with two channel groups: in training, where it pays, the idle channels through
        the covariance of the pixels (``repavit.layers.idle_covariance``; ``u`` seen as ``(B*H*W, C)``
        tokens, a view when it is channels-last); else :meth:`_split_hidden`. ``hidden_path`` as in
        ``ChannelIdleMlp`` (``"explicit"`` is ``"split"`` here)."""
        if (
            check_hidden_path(self.hidden_path) in ("auto", "covariance")
            and self.norm2.training
            and not is_fx_symbolic_tracing()
        ):
            b, c, h, w = u.shape
            t = u.permute(0, 2, 3, 1).reshape(-1, c)
            if covariance_applies(self.norm2, t, self.hidden_dim, self.act_dim, self.hidden_path == "covariance"):
                w1, b1, w2, b2 = self.fc1.weight.flatten(1), self.fc1.bias, self.fc2.weight.flatten(1), self.fc2.bias
                y = covariance_hidden(t, w1, b1, w2, b2, self.norm2, self.act, self.act_dim)
                return y.view(b, h, w, c).permute(0, 3, 1, 2)
        return self._split_hidden(u)

    @torch.jit.unused
    def _split_hidden(self, u: Tensor) -> Tensor:
        """The hidden layer as two channel groups, never concatenated (see ``ChannelIdleMlp``).

        Active and idle channels go through their own output channels of fc1, their own channels of
        BN2 (same statistics and running-stat updates as one BatchNorm2d over all ``h``) and their
        own input channels of fc2; the two products are summed. This saves the ``(B, h, H, W)``
        concatenation, four times the size of the ``(B, C, H, W)`` add that replaces it.
        """
        a = self.act_dim
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        norm = channel_group_batch_norm(self.norm2)
        active = norm(self.act(F.conv2d(u, w1[:a], None if b1 is None else b1[:a])), slice(0, a))
        idle = norm(F.conv2d(u, w1[a:], None if b1 is None else b1[a:]), slice(a, None))
        return F.conv2d(active, w2[:, :a], b2) + F.conv2d(idle, w2[:, a:])

    # ---- reparameterization -------------------------------------------------------------
    def fold(self) -> FoldedIdleFFN:
        """Fold BN1, BN2, the idle path, the layer scale and the residual (float64, running statistics)."""
        if self.feature_norm != "BatchNorm":
            raise layernorm_fold_error("an FFN")
        return fold_idle_ffn(
            self.fc1.weight.flatten(1),
            self.fc1.bias,
            self.fc2.weight.flatten(1),
            self.fc2.bias,
            BNStats.from_module(self.norm1),
            BNStats.from_module(self.norm2),
            self.act_dim,
            layer_scale=self.ls,
        )

    @torch.no_grad()
    def fuse(self) -> FusedIdleConvMlp:
        """Return the equivalent inference module (timm's ``fuse()`` protocol)."""
        fused = FusedIdleConvMlp(
            self.dim, self.act_dim, has_linear=self.act_dim < self.hidden_dim, hidden_dim=self.hidden_dim
        )
        fused.load_folded(self.fold(), dtype=self.fc1.weight.dtype, device=self.fc1.weight.device)
        return fused


class FusedIdleConvMlp(nn.Module):
    """Reparameterized NCHW channel-idle FFN, residual and layer scale included. Inference only.

    Same parameters as :class:`~repavit.layers.FusedIdleMlp`, as 1x1 convolutions:
    ``in_proj`` ``(C + a, C, 1, 1)`` holds ``[W_lin; W_act]`` (``(a, C, 1, 1)`` when nothing idles,
    ``(C, C, 1, 1)`` when everything idles), ``out_proj`` ``(C, a, 1, 1)`` holds ``W_out`` (with the
    output bias only when nothing idles, absent when ``a == 0``).
    """

    def __init__(self, dim: int, act_dim: int, has_linear: bool = True, hidden_dim: int = 0) -> None:
        super().__init__()
        if act_dim == 0 and not has_linear:
            raise UserError("a fused FFN needs a linear branch when no channel is activated")
        self.dim, self.act_dim, self.has_linear = dim, act_dim, has_linear
        # the training form's hidden width h (kept for messages and checkpoint checks; 0: unknown)
        self.hidden_dim = hidden_dim if hidden_dim else (act_dim if not has_linear else 0)
        lin_dim = dim if has_linear else 0
        self.in_proj = nn.Conv2d(dim, lin_dim + act_dim, 1)
        self.out_proj = nn.Conv2d(act_dim, dim, 1, bias=not has_linear) if act_dim > 0 else None
        self.act = nn.GELU()
        self.training = False

    def extra_repr(self) -> str:
        return f"dim={self.dim}, act_dim={self.act_dim}, has_linear={self.has_linear}"

    def train(self, mode: bool = True) -> FusedIdleConvMlp:
        if mode:
            raise RuntimeError(
                "this FFN is reparameterized (inference only) and cannot be trained; train the training-form "
                "model and reparameterize it afterwards"
            )
        return super().train(False)

    @torch.no_grad()
    def load_folded(
        self, folded: FoldedIdleFFN, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """Copy folded float64 matrices into this module's 1x1 convolution weights."""
        f = folded.to(dtype or self.in_proj.weight.dtype, device or self.in_proj.weight.device)
        if f.act_dim != self.act_dim or f.w_act.shape[1] != self.dim:
            raise UserError(
                f"folded FFN has act_dim {f.act_dim} and dim {f.w_act.shape[1]}, "
                f"module expects {self.act_dim}, {self.dim}"
            )
        if (f.w_lin is not None) != self.has_linear:
            raise UserError("folded FFN and module disagree on whether a linear (idle) branch exists")
        self.to(dtype=f.b_lin.dtype, device=f.b_lin.device)
        if self.has_linear:
            w_in, b_in = torch.cat((f.w_lin, f.w_act), 0), torch.cat((f.b_lin, f.b_act), 0)
        else:
            w_in, b_in = f.w_act, f.b_act
            self.out_proj.bias.copy_(f.b_lin)
        self.in_proj.weight.copy_(w_in[:, :, None, None])
        self.in_proj.bias.copy_(b_in)
        if self.out_proj is not None:
            self.out_proj.weight.copy_(f.w_out[:, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        if self.act_dim == 0:
            return self.in_proj(x)
        if not self.has_linear:
            return x + self.out_proj(self.act(self.in_proj(x)))
        # Two convolutions on row slices of in_proj (contiguous views) instead of one wide convolution
        # and a channel split: no strided copy of either branch, and the product accumulates in place.
        # Measured on CPU (1 thread, batch 16): never slower, up to 2.5x faster on PoolFormer's first stage.
        w, b, c = self.in_proj.weight, self.in_proj.bias, self.dim
        out = F.conv2d(x, w[:c], b[:c])  # (B, C, H, W): linear branch, identity folded in
        act = self.act(F.conv2d(x, w[c:], b[c:]))  # (B, a, H, W)
        return out.add_(self.out_proj(act))
