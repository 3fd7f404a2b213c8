"""The channel-idle hidden layer in training mode with its idle channels never computed: the same outputs,
gradients and running statistics for about half the FFN's multiply-adds.

In training, BN2 normalizes the idle channels ``z_i = u W1iᵀ + b1i`` by their batch statistics, and both
are functions of the covariance of ``u`` (tokens ``(M, C)``, ``ū`` their mean, ``u_c = u - ū``)::

    Σ = u_cᵀ u_c / M                           # (C, C), the batch covariance of u
    mean(z_i) = ū W1iᵀ + b1i                   # (h - a,)
    var(z_i)  = diag(W1i Σ W1iᵀ)               # (h - a,), the biased variance BatchNorm normalizes by
    BN2(z_i) W2iᵀ = u_c (W2i D W1i)ᵀ + W2i β_i, D = diag(γ_i / sqrt(var + eps))

So the idle path is one ``C x C`` matrix per step, ``W_idle = W2i D W1i``, applied to ``u_c``: the paper's
reparameterization, done on the batch statistics at every training step instead of on the running
statistics once after training. Autograd through ``Σ``, ``var`` and ``D`` gives the exact gradients of
the straightforward graph: BatchNorm's dependence of the statistics on every token included. The active
channels ``z_a`` (GELU, then BN2 over them) are computed as before.

Per FFN and training step (forward + backward), with ``k = (h - a) / C`` (3 at idle ratio 0.75), the
idle channels cost ``6 k M C²`` multiply-adds when materialized and ``5 M C² + 5 k C³`` here; for
RePaViT_Small at batch 32 (``M = 6304``, ``C = 384``) the FFN's GEMMs drop from ``24 M C²`` to
``about 11 M C²`` and nothing ``(M, h - a)`` is kept for backward. :func:`covariance_pays` applies it only
where it does fewer multiply-adds: ``M > 5 k C / (6 k - 5)`` tokens, about ``1.2 C`` at idle ratio 0.75 and
``1.4 C`` at 0.5, never when ``h - a <= 5 C / 6``.

Numerics: ``var`` is ``wᵀ Σ w`` instead of a sum over the tokens of ``z_i``, with ``Σ`` from centered tokens.
Rounding in ``Σ`` can cancel badly in ``wᵀ Σ w`` and ``Σ w`` for a channel whose weights lie along the
tokens' low-variance directions. A bound computed every step finds such channels, and the eager node
recomputes every one of them from its own pre-activations on the CPU, and the 16 most exposed on an
accelerator, where choosing by value would wait for the device (:func:`_recompute_exposed`). The plain-op
form (``torch.compile``, autocast) needs static shapes, so it recomputes only the variance of the 16 most
exposed ones (:func:`_direct_variance`). ``tests/test_layers.py`` checks float64 gradients with ``gradcheck``, and
float64 and float32 against the split graph. It also checks float32 against float64 on tokens with a mean of
3 and a covariance of condition number up to 1e6, with fc1 rows that are random, along the smallest
eigenvectors, or all idle rows in a low-variance subspace: the eager node errs no more than the float32
split graph (within 2x). The bias ``b1i`` of the idle channels gets a gradient of exactly 0: BatchNorm
removes it, and the straightforward graph only gives rounding noise there.

Two implementations: :class:`_CovarianceHidden`, one autograd node for eager float32/float64 (its
backward uses the symmetry of ``Σ``: one GEMM less than autograd through the plain ops), and
:func:`covariance_hidden_ops`, plain differentiable ops that ``torch.compile`` fuses and autocast runs
(the covariance and its ``C x C`` algebra in float32 there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .idle_autograd import batch_statistics_apply, fused_hidden_applies

__all__ = ["covariance_applies", "covariance_hidden", "covariance_hidden_ops", "covariance_pays"]


def covariance_pays(tokens: int, dim: int, hidden: int, active: int) -> bool:
    """Whether the idle channels through the covariance take fewer multiply-adds than materialized
    (forward + backward): ``5 M C² + 5 (h - a) C²`` against ``6 M C (h - a)``."""
    idle = hidden - active
    return idle > 0 and 5 * tokens * dim + 5 * idle * dim < 6 * tokens * idle


def _advance(bn: nn.Module) -> float:
    """``num_batches_tracked`` + 1 and the momentum of this step (the cumulative average's when None)."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


@torch.no_grad()
def _update_stats(rm: Tensor, rv: Tensor, mean: Tensor, var: Tensor, momentum: float, m: int) -> None:
    """Running statistics as BatchNorm updates them from a batch's mean and biased variance (the unbiased one)."""
    rm.mul_(1 - momentum).add_(mean.to(rm.dtype), alpha=momentum)
    rv.mul_(1 - momentum).add_(var.to(rv.dtype), alpha=momentum * m / (m - 1))


# Cancellation guard (:func:`_exposed_channels`): a channel is recomputed from its own pre-activations when
# the rounding bound of ``wᵀ Σ w`` exceeds ``EXPOSURE * C`` times its variance (random weights on isotropic
# tokens sit near 0.64 C); the plain-op form recomputes the ``DIRECT_VARIANCE_CHANNELS`` most exposed ones.
EXPOSURE = 4.0
DIRECT_VARIANCE_CHANNELS = 16


@torch.no_grad()
def _exposure(w1i: Tensor, cov: Tensor, var: Tensor, eps: float) -> Tensor:
    """Per idle channel, the rounding bound of ``wᵀ Σ w``, about ``ε (Σ_k |w_k| σ_k)²``, over ``var + eps``,
    in units of ``C``: large when ``w`` lies along the tokens' low-variance directions, where ``wᵀ Σ w`` and
    ``Σ w`` cancel (a sum over the tokens of ``z = u_c w`` does not)."""
    bound = (w1i.abs() @ cov.diagonal().clamp_min(0).sqrt()).square()
    return bound / (var.clamp_min(0) + eps) / cov.shape[0]


# Devices where the eager node's guard may pick its channels by value (``nonzero``): on an accelerator that
# would wait for the device in every FFN, so there it takes the ``DIRECT_VARIANCE_CHANNELS`` most exposed.
DYNAMIC_GUARD_DEVICES = {"cpu"}


@torch.no_grad()
def _recompute_exposed(uc: Tensor, w1i: Tensor, cov: Tensor, p: Tensor, var: Tensor, eps: float) -> Tensor:
    """The eager node's guard: on the CPU every channel over ``EXPOSURE``, elsewhere the
    ``DIRECT_VARIANCE_CHANNELS`` most exposed, gets its variance ``mean(z²)`` and its row of ``p = W1i Σ``
    (``zᵀ u_c / M``, used by the backward) from its own ``(M, k)`` pre-activations ``z``, in place in ``p``;
    returns the variance. On the CPU it costs nothing where no channel is exposed, and at most the forward of
    materializing the idle channels."""
    var = var.clamp_min(0)
    exposure = _exposure(w1i, cov, var, eps)
    if uc.device.type in DYNAMIC_GUARD_DEVICES:
        idx = (exposure > EXPOSURE).nonzero().squeeze(1)
    else:
        idx = exposure.topk(min(DIRECT_VARIANCE_CHANNELS, var.numel())).indices
    if idx.numel():
        z = uc @ w1i[idx].t()  # (M, k)
        var[idx] = z.square().mean(0)
        p[idx] = (z.t() @ uc).div_(uc.shape[0])
    return var


@torch.no_grad()
def _direct_variance(uc: Tensor, w1i: Tensor, cov: Tensor, var: Tensor, eps: float) -> Tensor:
    """The plain-op form's guard, with static shapes for ``torch.compile``: the ``DIRECT_VARIANCE_CHANNELS``
    most exposed channels get their variance from their own pre-activations (values only; the gradient
    follows the covariance formula)."""
    var = var.clamp_min(0)
    idx = _exposure(w1i, cov, var, eps).topk(min(DIRECT_VARIANCE_CHANNELS, var.numel())).indices
    direct = (uc @ w1i[idx].t()).square().mean(0)
    return var.index_copy(0, idx, direct.to(var.dtype))


class _CovarianceHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w1, b1, w2, b2, gamma, beta, running_mean, running_var, a: int, momentum: float, eps: float):
        m = u.shape[0]
        ubar = u.mean(0)
        uc = u - ubar
        w1a, w1i, w2a, w2i = w1[:a], w1[a:], w2[:, :a], w2[:, a:]
        # active channels: fc1 rows, GELU, BN2 through BatchNorm's own kernel (x̂, running statistics)
        bias_a = w1a @ ubar if b1 is None else torch.addmv(b1[:a], w1a, ubar)
        za = torch.addmm(bias_a, uc, w1a.t())  # (M, a), = u W1aᵀ + b1a
        xa, _, inv_a = torch.native_batch_norm(
            F.gelu(za), None, None, running_mean[:a], running_var[:a], True, momentum, eps
        )
        # idle channels: their statistics from Σ, their path one C x C matrix
        cov = (uc.t() @ uc).div_(m)
        p = w1i @ cov  # (h - a, C)
        var = _recompute_exposed(uc, w1i, cov, p, (p * w1i).sum(1), eps)
        s = torch.rsqrt(var + eps)
        mean_i = w1i @ ubar if b1 is None else torch.addmv(b1[a:], w1i, ubar)
        _update_stats(running_mean[a:], running_var[a:], mean_i, var, momentum, m)
        w_idle = (w2i * (gamma[a:] * s)) @ w1i  # (C, C)
        shift = w2 @ beta if b2 is None else torch.addmv(b2, w2, beta)
        y = torch.addmm(shift, xa, (w2a * gamma[:a]).t()).addmm_(uc, w_idle.t())
        ctx.save_for_backward(uc, ubar, w1, w2, gamma, beta, za, xa, inv_a, p, s, w_idle)
        ctx.has_b1, ctx.has_b2, ctx.a = b1 is not None, b2 is not None, a
        return y

    @staticmethod
    @once_differentiable  # second derivatives would be incomplete: refuse them instead
    def backward(ctx, dy):
        uc, ubar, w1, w2, gamma, beta, za, xa, inv_a, p, s, w_idle = ctx.saved_tensors
        a, m = ctx.a, uc.shape[0]
        db2 = dy.sum(0)
        dza, dw2a, dgamma_a, dbeta_a = _active_backward(dy, db2, w2[:, :a], gamma[:a], beta[:a], za, xa, inv_a)
        db1a = dza.sum(0)
        dw1a = (dza.t() @ uc).addr_(db1a, ubar)
        dw1i, dw2i, dgamma_i, dcov = _idle_backward(dy.t() @ uc, db2, w1[a:], w2[:, a:], gamma[a:], beta[a:], p, s)
        du = None
        if ctx.needs_input_grad[0]:  # the active rows of fc1, the idle matrix (through u_c) and Σ (symmetric)
            du = torch.addmm((db2 / -m) @ w_idle, dy, w_idle).addmm_(uc, dcov, alpha=2.0 / m).addmm_(dza, w1[:a])
        dw1 = torch.cat((dw1a, dw1i))
        dw2 = torch.cat((dw2a, dw2i), 1)
        db1 = torch.cat((db1a, db1a.new_zeros(w1.shape[0] - a))) if ctx.has_b1 else None
        dgamma = torch.cat((dgamma_a, dgamma_i))
        dbeta = torch.cat((dbeta_a, w2[:, a:].t() @ db2))
        return du, dw1, db1, dw2, db2 if ctx.has_b2 else None, dgamma, dbeta, None, None, None, None, None


def _active_backward(dy, db2, w2a, gamma_a, beta_a, za, xa, inv_a):
    """The active channels' backward through fc2, BN2 (BatchNorm's own backward kernel on x̂ with γ/σ as
    its weight) and GELU: ``∂z_a``, ``∂W2a``, ``∂γ_a``, ``∂β_a``."""
    dw2a = (dy.t() @ xa).mul_(gamma_a).addr_(db2, beta_a)
    d = dy @ w2a  # (M, a)
    zero, one = torch.zeros_like(inv_a), torch.ones_like(inv_a)
    dga, dgamma_a, dbeta_a = torch.ops.aten.native_batch_norm_backward(
        d, xa, gamma_a * inv_a, None, None, zero, one, True, 0.0, [True, True, True]
    )
    del d
    return torch.ops.aten.gelu_backward(dga, za), dw2a, dgamma_a, dbeta_a


def _idle_backward(dw_idle, db2, w1i, w2i, gamma_i, beta_i, p, s):
    """From ``∂W_idle = dyᵀ u_c`` to ``∂W1i``, ``∂W2i``, ``∂γ_i`` and ``∂Σ`` (all ``C x C``-sized algebra)."""
    di = gamma_i * s
    q = w2i.t() @ dw_idle  # (h - a, C)
    dd = (q * w1i).sum(1)  # ∂D
    dvar = dd * gamma_i * s.pow(3) * -0.5
    dw1i = (q * di[:, None]).add_(p * dvar[:, None], alpha=2.0)
    dw2i = (dw_idle @ w1i.t()).mul_(di).addr_(db2, beta_i)
    dcov = (w1i.t() * dvar) @ w1i
    return dw1i, dw2i, dd * s, dcov


def covariance_applies(bn: nn.Module, u: Tensor, hidden: int, active: int, forced: bool = False) -> bool:
    """Whether the covariance path computes what ``bn`` would on tokens ``u`` ``(M, C)`` (a plain BatchNorm in
    training mode with affine parameters and running statistics, more than one token), and pays (or is
    ``forced``)."""
    return batch_statistics_apply(u, bn) and (forced or covariance_pays(u.shape[0], u.shape[1], hidden, active))


def covariance_hidden(
    u: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, bn: nn.Module, act: nn.Module, a: int
) -> Tensor:
    """``F.linear(bn(partial_act(F.linear(u, w1, b1))), w2, b2)`` for tokens ``u`` ``(M, C)`` in training
    mode, the idle channels through the covariance of ``u`` (module docstring); updates ``bn``'s running
    statistics and ``num_batches_tracked`` as BatchNorm does. One autograd node in eager float32/float64 with
    exact GELU (:class:`_CovarianceHidden`), plain ops otherwise (:func:`covariance_hidden_ops`; half-precision
    weights and autocast keep the covariance in float32 there: in half precision ``u_cᵀ u_c`` overflows)."""
    if u.dtype in (torch.float32, torch.float64) and fused_hidden_applies(u, bn, act):
        momentum = _advance(bn)
        return _CovarianceHidden.apply(
            u, w1, b1, w2, b2, bn.weight, bn.bias, bn.running_mean, bn.running_var, a, momentum, bn.eps
        )
    return covariance_hidden_ops(u, w1, b1, w2, b2, bn, act, a)


def covariance_hidden_ops(
    u: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, bn: nn.Module, act: nn.Module, a: int
) -> Tensor:
    """The covariance path in plain differentiable ops, for ``torch.compile`` and autocast (where the
    covariance, the statistics and ``W_idle`` are float32), and any activation ``act``."""
    momentum = _advance(bn)
    m = u.shape[0]
    gamma, beta = bn.weight, bn.bias
    ubar = u.mean(0)
    uc = u - ubar
    ga = act(F.linear(u, w1[:a], None if b1 is None else b1[:a]))
    # the running statistics are updated below, not by batch_norm: autograd would keep them for its backward,
    # and the idle channels' in-place update of the same buffers would then invalidate it
    xa = F.batch_norm(ga, None, None, gamma[:a], beta[:a], True, 0.0, bn.eps)
    y = F.linear(xa, w2[:, :a], b2)
    wide = torch.promote_types(u.dtype, torch.float32)  # float32 under autocast (float64 stays)
    with torch.autocast(u.device.type, enabled=False):
        ucw, w1i, w2i = uc.to(wide), w1[a:].to(wide), w2[:, a:].to(wide)
        cov = ucw.t() @ ucw / m
        var = ((w1i @ cov) * w1i).sum(1)
        var = var + (_direct_variance(ucw, w1i, cov, var, bn.eps) - var).detach()  # values, not gradients
        with torch.no_grad():
            var_a, mean_a = torch.var_mean(ga.detach().to(wide), 0, correction=0)
            _update_stats(bn.running_mean[:a], bn.running_var[:a], mean_a, var_a, momentum, m)
            mean_i = w1i @ ubar.to(wide) + (0 if b1 is None else b1[a:].to(wide))
            _update_stats(bn.running_mean[a:], bn.running_var[a:], mean_i, var, momentum, m)
        w_idle = (w2i * (gamma[a:].to(wide) * torch.rsqrt(var + bn.eps))) @ w1i
        shift = w2i @ beta[a:].to(wide)
    return y + F.linear(uc, w_idle.to(uc.dtype), shift.to(uc.dtype))
