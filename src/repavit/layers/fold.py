"""Pure folding functions for structural reparameterization.

Everything here is plain tensor math (no modules), so it can be tested against an independent
formulation and reused by every family (ViT, Swin, PoolFormer, MLP-Mixer).

Notation (PyTorch's ``(out, in)`` weight layout), for an FFN with input width ``C``, hidden width
``h`` and ``a`` activated channels (the first ``a`` hidden channels)::

    u   = BN1(x)                    s1 = g1 / sqrt(v1 + eps1)
    z   = W1 u + b1                 (h x C)
    z[:a] = GELU(z[:a])
    y   = W2 BN2(z) + b2            (C x h)
    out = x + ls * y                (ls: optional per-channel layer scale, 1 if absent)

folds into::

    out = W_lin x + b_lin + W_out GELU(W_act x + b_act)

    W_act = W1'[:a]          b_act = b1'[:a]
    W_out = ls * W2'[:, :a]
    W_lin = I + ls * W2'[:, a:] W1'[a:]
    b_lin = ls * (b2' + W2'[:, a:] b1'[a:])

with ``W1' = W1 diag(s1)``, ``b1' = W1 (beta1 - mu1 s1) + b1`` and likewise for BN2 into W2.
All folds are computed in float64 and cast back to the original dtype at the end, so the folded
fp32 weights carry no more rounding than a single cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError


@dataclass
class BNStats:
    """Inference-time parameters of a BatchNorm layer."""

    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> BNStats:
        if bn.running_mean is None or bn.running_var is None:
            raise UserError(
                f"cannot fold {type(bn).__name__} without running statistics "
                "(track_running_stats=False); expected a BatchNorm with running_mean/running_var"
            )
        return cls(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)

    def scale_shift(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """Return ``(s, t)`` such that ``BN(x) = s * x + t`` per channel in eval mode."""
        mean = self.running_mean.to(dtype)
        var = self.running_var.to(dtype)
        gamma = torch.ones_like(mean) if self.weight is None else self.weight.detach().to(dtype)
        beta = torch.zeros_like(mean) if self.bias is None else self.bias.detach().to(dtype)
        s = gamma / torch.sqrt(var + self.eps)
        return s, beta - mean * s


def fold_bn_before_linear(weight: Tensor, bias: Tensor | None, bn: BNStats) -> tuple[Tensor, Tensor]:
    """Fold ``linear(BN(x))`` into one linear map. Returns float64 ``(W', b')``.

    ``weight`` is ``(out, in)``; the BatchNorm normalizes the ``in`` channels.
    """
    w = weight.detach().to(torch.float64)
    b = (
        torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if bias is None
        else bias.detach().to(torch.float64)
    )
    s, t = bn.scale_shift()
    return w * s[None, :], w @ t + b


def fold_bn_after_conv(weight: Tensor, bias: Tensor | None, bn: BNStats) -> tuple[Tensor, Tensor]:
    """Fold ``BN(conv(x))`` (BatchNorm over the conv's output channels) into one conv. Returns float64 ``(W', b')``.

    ``BN(W * x + b) = s * (W * x + b) + t``: ``W' = s[:, None, ...] W``, ``b' = s b + t``.
    """
    w = weight.detach().to(torch.float64)
    b = (
        torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if bias is None
        else bias.detach().to(torch.float64)
    )
    s, t = bn.scale_shift()
    s, t = s.to(w.device), t.to(w.device)
    return w * s.reshape(-1, *([1] * (w.dim() - 1))), s * b + t


@dataclass
class FoldedIdleFFN:
    """The three matrices of a reparameterized channel-idle FFN (float64 unless cast)."""

    w_lin: Tensor | None  # (C, C): idle path + identity; None when no channel idles
    b_lin: Tensor  # (C,): every bias that survives (on the output side)
    w_act: Tensor  # (a, C)
    b_act: Tensor  # (a,)
    w_out: Tensor  # (C, a)

    @property
    def act_dim(self) -> int:
        return self.w_act.shape[0]

    def to(self, dtype: torch.dtype, device: torch.device | None = None) -> FoldedIdleFFN:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return FoldedIdleFFN(*(cast(t) for t in (self.w_lin, self.b_lin, self.w_act, self.b_act, self.w_out)))


def fold_idle_ffn(
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    bn1: BNStats,
    bn2: BNStats,
    act_dim: int,
    layer_scale: Tensor | None = None,
) -> FoldedIdleFFN:
    """Fold a channel-idle FFN with its residual into ``W_lin``, ``W_act``, ``W_out`` (float64).

    Args:
        fc1_weight: ``(h, C)`` (1x1 conv weights are flattened by the caller).
        fc1_bias: ``(h,)`` or None.
        fc2_weight: ``(C, h)``.
        fc2_bias: ``(C,)`` or None.
        bn1: BatchNorm over the ``C`` input channels.
        bn2: BatchNorm over the ``h`` hidden channels.
        act_dim: number of activated hidden channels ``a`` (the first ``a``).
        layer_scale: optional ``(C,)`` per-channel scale applied to the FFN output before the
            residual add (PoolFormer's ``mlp.ls``); folded into both weight and bias.

    Returns:
        The folded matrices. ``w_lin`` is None when ``a == h`` (nothing idles): the residual then
        stays a plain identity add and ``b_lin`` is the output bias.
    """
    h, c = fc1_weight.shape
    if fc2_weight.shape != (c, h):
        raise UserError(f"fc2 weight has shape {tuple(fc2_weight.shape)}, expected {(c, h)} to match fc1 {(h, c)}")
    if not 0 <= act_dim <= h:
        raise UserError(f"act_dim={act_dim} outside [0, {h}]")
    w1, b1 = fold_bn_before_linear(fc1_weight, fc1_bias, bn1)
    w2, b2 = fold_bn_before_linear(fc2_weight, fc2_bias, bn2)
    if layer_scale is not None:
        ls = layer_scale.detach().to(torch.float64)
        w2, b2 = w2 * ls[:, None], b2 * ls
    a = act_dim
    w_act, b_act, w_out = w1[:a], b1[:a], w2[:, :a]
    if a == h:
        return FoldedIdleFFN(None, b2, w_act, b_act, w_out)
    w_idle_in, b_idle_in, w_idle_out = w1[a:], b1[a:], w2[:, a:]
    eye = torch.eye(c, dtype=torch.float64, device=w1.device)
    w_lin = eye + w_idle_out @ w_idle_in
    b_lin = b2 + w_idle_out @ b_idle_in
    return FoldedIdleFFN(w_lin, b_lin, w_act, b_act, w_out)
