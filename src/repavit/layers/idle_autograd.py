"""The channel-idle hidden layer in training mode as one autograd function: fewer nodes, less saved memory.

``hidden_layer(u, fc1, bn2, fc2, a)`` computes, for tokens ``u`` of shape ``(M, C)`` and a BatchNorm2
in training mode::

    z = u W1^T + b1                    # (M, h), one GEMM
    g = [GELU(z[:, :a]), z[:, a:]]     # the first a channels active, the rest idle
    y = BN2(g) W2^T + b2               # batch statistics over the M tokens; running statistics updated

exactly as ``fc2(bn2(partial_gelu(fc1(u))))`` does, gradients included, but as one autograd node
instead of six, and it keeps less for the backward pass:

* saved: ``u`` (fc1's input, which autograd keeps anyway), the active pre-activations ``z[:, :a]``
  ``(M, a)``, and the normalized hidden ``x̂ = (g - mean) / std`` ``(M, h)``. The split graph of plain
  ops keeps fc1's output for GELU and BN2, the GELU output for BN2 and BN2's output for fc2's weight
  gradient: 2h + a columns per token against h + a here;
* BN2's affine is folded into fc2 on the fly (``BN2(g) W2^T = x̂ (W2 diag γ)^T + W2 β``), so BN2's
  output is never materialized, forward or backward (``∂W2 = (dyᵀ x̂) diag γ + db2 βᵀ``);
* BN2 runs through BatchNorm's own kernels: ``native_batch_norm`` without affine gives x̂, the batch
  statistics and the running-statistics update; in backward, ``native_batch_norm_backward`` on x̂ (mean 0,
  inverse std 1) with ``γ/σ`` as its weight gives ``dg = γ/σ · (d - mean(d) - x̂ mean(d x̂))``, ``∂γ`` and
  ``∂β`` in one call. The GELU derivative is applied to the first ``a`` columns of ``dg``.

``ChannelIdleMlp`` takes it (``hidden_path="explicit"``) where the covariance path of
``repavit.layers.idle_covariance``, which never computes the idle channels, does not pay: batches with few
tokens. It runs only where it is exactly the straightforward graph: BatchNorm in training mode with affine
parameters and running statistics, exact GELU, no autocast, no ``torch.compile`` tracing (there the
compiler fuses the plain graph itself), and more than one token. Anything else takes the plain ops.
``tests/test_layers.py`` checks it against them with ``torch.autograd.gradcheck`` in float64 and on the
running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = ["batch_statistics_apply", "fused_hidden_applies", "hidden_layer"]


def batch_statistics_apply(u: Tensor, bn: nn.Module) -> bool:
    """Whether ``bn`` normalizes tokens ``u`` ``(M, C)`` by their batch statistics and updates its running ones:
    a plain BatchNorm in training mode with affine parameters and running statistics, more than one token."""
    return (
        type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d)  # on tokens (M, C) either is one statistic per channel
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and bn.running_mean is not None
        and u.dim() == 2
        and u.shape[0] > 1
    )


def fused_hidden_applies(u: Tensor, bn: nn.Module, act: nn.Module) -> bool:
    """Whether :func:`hidden_layer` computes exactly what the plain ops would (module docstring)."""
    return (
        not is_fx_symbolic_tracing()
        and batch_statistics_apply(u, bn)
        and type(act) is nn.GELU
        and act.approximate == "none"
        and not torch.is_autocast_enabled(u.device.type)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_scripting()
    )


class _HiddenLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w1, b1, w2, b2, gamma, beta, running_mean, running_var, a: int, momentum: float, eps: float):
        z = torch.addmm(b1, u, w1.t()) if b1 is not None else u @ w1.t()  # (M, h)
        za = z[:, :a].clone()  # the active pre-activations, for GELU's derivative
        z[:, :a] = F.gelu(za)
        # BatchNorm's own kernel: x̂ (no affine), the batch statistics, the running statistics updated in place
        xhat, _, invstd = torch.native_batch_norm(z, None, None, running_mean, running_var, True, momentum, eps)
        del z
        shift = w2 @ beta if b2 is None else torch.addmv(b2, w2, beta)
        y = torch.addmm(shift, xhat, (w2 * gamma).t())  # BN2's affine folded into fc2 on the fly
        ctx.save_for_backward(u, w1, w2, gamma, beta, za, xhat, invstd)
        ctx.has_b1, ctx.has_b2, ctx.a = b1 is not None, b2 is not None, a
        return y

    @staticmethod
    @once_differentiable  # second derivatives would be incomplete: refuse them instead
    def backward(ctx, dy):
        u, w1, w2, gamma, beta, za, xhat, invstd = ctx.saved_tensors
        a = ctx.a
        db2 = dy.sum(0)
        dw2 = (dy.t() @ xhat).mul_(gamma).addr_(db2, beta)  # dyᵀ BN2(g), without BN2(g)
        d = dy @ w2  # ∂BN2(g), (M, h)
        # BatchNorm's own backward kernel on x̂ (mean 0, inverse std 1) with γ/σ as the weight gives
        # ∂g = γ/σ (d - mean(d) - x̂ mean(d x̂)), ∂γ = Σ d x̂ and ∂β = Σ d in one call
        zero, one = torch.zeros_like(invstd), torch.ones_like(invstd)
        dg, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            d, xhat, gamma * invstd, None, None, zero, one, True, 0.0, [True, True, True]
        )
        del d
        dg[:, :a] = torch.ops.aten.gelu_backward(dg[:, :a], za)  # GELU's derivative on the active channels
        dw1 = dg.t() @ u
        db1 = dg.sum(0) if ctx.has_b1 else None
        du = dg @ w1 if ctx.needs_input_grad[0] else None
        return du, dw1, db1, dw2, db2 if ctx.has_b2 else None, dgamma, dbeta, None, None, None, None, None


def hidden_layer(u: Tensor, fc1: nn.Linear, bn: nn.BatchNorm1d, fc2: nn.Linear, a: int) -> Tensor:
    """``fc2(bn(partial_gelu(fc1(u))))`` for ``u`` ``(M, C)`` in training mode, as one autograd node.

    Updates ``bn``'s running statistics and ``num_batches_tracked`` as ``nn.BatchNorm1d`` does (momentum, or
    the cumulative average when ``momentum`` is None; the running variance is the unbiased one).
    """
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return _HiddenLayer.apply(
        u, fc1.weight, fc1.bias, fc2.weight, fc2.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        a, momentum, bn.eps,
    )  # fmt: skip
