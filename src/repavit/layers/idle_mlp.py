"""The channel-idle FFN (training form) and its reparameterized inference form.

Training form (RePaViT, ICML 2025, arXiv 2505.21847, Eq. 2), tokens ``x`` of shape ``(..., C)``::

    u = BN1(x)                      # statistics over all tokens of the batch
    z = fc1(u)                      # C -> h
    z[..., :a] = GELU(z[..., :a])   # the other h - a channels idle (identity)
    y = fc2(BN2(z))                 # h -> C
    out = x + drop_path(y)          # the FFN owns its residual

Inference form (after :meth:`ChannelIdleMlp.fuse`)::

    out = x W_lin^T + b_lin + GELU(x W_act^T + b_act) W_out^T

computed as one GEMM for ``[W_lin; W_act]`` followed by one ``addmm`` that accumulates the
activated branch straight into the linear branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from ..errors import ArgumentError, UserError
from .fold import BNStats, FoldedIdleFFN, fold_idle_ffn
from .idle_autograd import fused_hidden_applies, hidden_layer
from .idle_covariance import covariance_applies, covariance_hidden

FEATURE_NORMS = ("BatchNorm", "LayerNorm")
HEURISTICS = ("static", "linear")
# ChannelIdleMlp.hidden_path: how the hidden layer runs in training
HIDDEN_PATHS = ("auto", "covariance", "explicit", "split")
# What every front end accepts for ``heuristic``: the two schedules, and the authors' "none" (= static).
HEURISTIC_CHOICES = (*HEURISTICS, "none")
_STATIC_ALIASES = ("none", "")
# Why a LayerNorm FFN has no fused form (every refusal to fold one says this).
LAYERNORM_CANNOT_FOLD = "LayerNorm normalizes each token by its own statistics, which no fixed matrix can absorb"


def canonical_heuristic(heuristic: str) -> str:
    """``"static"`` or ``"linear"``; the authors' ``"none"`` and ``""`` mean ``"static"``."""
    if heuristic in _STATIC_ALIASES:
        return "static"
    if heuristic not in HEURISTICS:
        raise UserError(f"unknown heuristic {heuristic!r}; expected one of {', '.join(HEURISTICS)}")
    return heuristic


def check_static_heuristic(heuristic: str, family: str) -> str:
    """Accept only the constant idle-ratio schedule (``"static"``, or the authors' aliases ``"none"``/``""``).

    The per-block ``"linear"`` schedule exists for RePaViT only; the authors' other families ignore
    the argument, which would silently train a different model than asked for.
    """
    if canonical_heuristic(heuristic) == "static":
        return "static"
    raise UserError(f"{family} supports only heuristic='static' (a constant idle ratio), got {heuristic!r}")


def layernorm_fold_error(what: str) -> ArgumentError:
    """The one refusal to fold ``what`` (``"an FFN"``, ``"a model"``) built with LayerNorm FFNs."""
    return ArgumentError(
        "cannot reparameterize {what} with {feature_norm}='LayerNorm': {why}; train it with {feature_norm}='BatchNorm'",
        what=what,
        why=LAYERNORM_CANNOT_FOLD,
    )


def check_idle_ratio(idle_ratio: float) -> float:
    if isinstance(idle_ratio, bool) or not isinstance(idle_ratio, (int, float)) or not 0.0 <= idle_ratio <= 1.0:
        raise UserError(f"idle_ratio must be a number in [0, 1], got {idle_ratio!r}")
    return float(idle_ratio)


def check_hidden_path(path: str) -> str:
    """``path`` if it is one of ``HIDDEN_PATHS`` (a channel-idle FFN's ``hidden_path``), else an ArgumentError."""
    if path not in HIDDEN_PATHS:
        raise ArgumentError(f"hidden_path must be one of {', '.join(HIDDEN_PATHS)}, got {path!r}")
    return path


def check_feature_norm(feature_norm: str) -> str:
    if feature_norm not in FEATURE_NORMS:
        raise UserError(f"unknown feature_norm {feature_norm!r}; expected one of {', '.join(FEATURE_NORMS)}")
    return feature_norm


def active_channels(hidden_dim: int, idle_ratio: float, rounding: str = "ceil") -> int:
    """Number of activated hidden channels ``a``.

    ``ceil(h * (1 - idle_ratio))`` for ViT, Swin and MLP-Mixer; PoolFormer uses ``int(...)``
    (``rounding="floor"``). Computed in float64 exactly like the reference (``math.ceil``).
    RePa-LV-ViT rounds to the nearest integer (``rounding="round"``), so that its default ratio 2/3
    activates exactly ``h / 3`` channels (``ceil`` of the float64 product ``1152 * (1 - 2/3)`` is 385).
    """
    idle_ratio = check_idle_ratio(idle_ratio)
    value = hidden_dim * (1.0 - idle_ratio)
    if rounding == "ceil":
        return int(math.ceil(value))
    if rounding == "floor":
        return int(value)
    if rounding == "round":
        return int(math.floor(value + 0.5))
    raise UserError(f"unknown rounding {rounding!r}; expected 'ceil', 'floor' or 'round'")


def idle_ratios_for_depth(idle_ratio: float, depth: int, heuristic: str = "static") -> list[float]:
    """Per-block idle ratios.

    ``"static"``: ``idle_ratio`` in every block. ``"linear"``: rises linearly from
    ``(2r - 1) + (2 - 2r) / (depth - 1)`` to 1.0 at block ``depth - 2``; the last block is fully
    activated (ratio 0). Values below 0 (``r < 0.5``) are clamped to 0.
    """
    r = check_idle_ratio(idle_ratio)
    heuristic = canonical_heuristic(heuristic)
    if heuristic == "static" or depth == 1:
        return [r] * depth
    ratios = [(2 * r - 1) + (2 - 2 * r) / (depth - 1) * (i + 1) for i in range(depth - 1)] + [0.0]
    return [min(max(v, 0.0), 1.0) for v in ratios]


class PartialActivation:
    """``_partial_act(z)``: ``self.act`` on the first ``self.act_dim`` channels of ``z`` (axis 1), the rest unchanged.

    A mixin of the training-form FFNs (put it before ``nn.Module``). No mask and no activation
    computed on idle channels; works for ``(M, h)`` tokens and ``(B, h, H, W)`` maps alike, and
    under TorchScript and FX (the branch reads the module's ``hidden_dim``, not a traced shape).
    """

    def _partial_act(self, z: Tensor) -> Tensor:
        a = self.act_dim
        if a == self.hidden_dim:
            return self.act(z)
        if a == 0:
            return z
        return torch.cat((self.act(z[:, :a]), z[:, a:]), dim=1)


class ChannelIdleMlp(PartialActivation, nn.Module):
    """Channel-idle FFN in its training form, with its residual connection.

    Args:
        dim: input/output channels ``C``.
        hidden_dim: hidden channels ``h``.
        idle_ratio: share of hidden channels that skip the activation.
        channel_idle: if False, every hidden channel is activated (plain FFN).
        feature_norm: ``"BatchNorm"`` (reparameterizable) or ``"LayerNorm"`` (pre-LN FFN, no BN2).
        drop_path: stochastic depth rate on the FFN branch.
        rounding: ``"ceil"``, ``"floor"`` or ``"round"`` for the number of active channels.
        act_layer: activation module class (exact GELU by default).
        skip_lam: the FFN branch is divided by this before the residual add (LV-ViT's ``skip_lam``);
            the fold absorbs ``1 / skip_lam`` into the output weights and bias.
    """

    # How the hidden layer runs in training (every path computes the same; the benchmark compares them):
    # "auto": "covariance" where it takes fewer multiply-adds (repavit.layers.idle_covariance), else
    # "explicit"; "covariance": the idle channels never computed, through the covariance of the tokens;
    # "explicit": one autograd node with every channel materialized (repavit.layers.idle_autograd);
    # "split": plain ops, the two channel groups apart (_split_hidden). Set it on the class or an instance.
    hidden_path: str = "auto"

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        idle_ratio: float = 0.75,
        channel_idle: bool = True,
        feature_norm: str = "BatchNorm",
        drop_path: float = 0.0,
        rounding: str = "ceil",
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        skip_lam: float = 1.0,
    ) -> None:
        super().__init__()
        check_feature_norm(feature_norm)
        if isinstance(skip_lam, bool) or not isinstance(skip_lam, (int, float)) or not skip_lam > 0:
            raise UserError(f"skip_lam must be a positive number, got {skip_lam!r}")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.rounding, self.skip_lam = rounding, float(skip_lam)
        self.feature_norm = feature_norm
        self.idle_ratio = check_idle_ratio(idle_ratio) if channel_idle else 0.0
        self.act_dim = active_channels(hidden_dim, self.idle_ratio, rounding) if channel_idle else hidden_dim
        # Registration order follows the authors' state_dict order (fc1, fc2, norm1, norm2).
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        if feature_norm == "BatchNorm":
            self.norm1: nn.Module = nn.BatchNorm1d(dim)
            self.norm2: nn.Module = nn.BatchNorm1d(hidden_dim)
        else:
            self.norm1 = nn.LayerNorm(dim)
            self.norm2 = nn.Identity()
        self.act = act_layer()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"act_dim={self.act_dim}/{self.hidden_dim}, feature_norm={self.feature_norm}"

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        # BatchNorm1d on (B*N, C) is BatchNorm1d on (B, C, N) without the transposes: same
        # per-channel statistics over every token, same running-stat update.
        u = self.norm1(x.reshape(-1, self.dim))  # (B*N, C)
        if torch.jit.is_scripting():  # compiled alone: the eager branch below is not
            y = self.fc2(self.norm2(self._partial_act(self.fc1(u))))
        else:
            y = self._hidden(u)
        y = self.drop_path(y.reshape(shape))
        if self.skip_lam != 1.0:
            y = y / self.skip_lam
        return x + y  # (B, N, C)

    def _split_norm2(self) -> bool:
        """Whether the two channel groups can be normalized apart (a plain BatchNorm1d over partly idle channels)."""
        return 0 < self.act_dim < self.hidden_dim and type(self.norm2) is nn.BatchNorm1d

    @torch.jit.unused
    def _hidden(self, u: Tensor) -> Tensor:
        """``fc2(norm2(partial_act(fc1(u))))`` for tokens ``u`` ``(M, C)``, the way :meth:`hidden_path_for` says."""
        path = self.hidden_path_for(u)
        if path == "covariance":
            w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
            return covariance_hidden(u, w1, b1, w2, b2, self.norm2, self.act, self.act_dim)
        if path == "explicit":
            return hidden_layer(u, self.fc1, self.norm2, self.fc2, self.act_dim)
        if path == "split":
            return self._split_hidden(u)
        # LayerNorm form, nothing / everything idle, a converted norm (e.g. SyncBatchNorm)
        return self.fc2(self.norm2(self._partial_act(self.fc1(u))))

    @torch.jit.unused
    def hidden_path_for(self, u: Tensor) -> str:
        """The path the hidden layer takes for tokens ``u``: ``"covariance"``, ``"explicit"``, ``"split"``, or
        ``"plain"`` (one op after another: no BN2 to split, e.g. LayerNorm form, no idle channel, SyncBatchNorm).

        ``covariance`` needs a plain BatchNorm1d in training mode with affine parameters and running statistics
        and more than one token; ``explicit`` also exact GELU in eager mode (no autocast, no ``torch.compile``).
        FX symbolic tracing always gets ``split`` (its graph cannot depend on the batch size)."""
        check_hidden_path(self.hidden_path)
        if not self._split_norm2():
            return "plain"
        if self.hidden_path == "split" or is_fx_symbolic_tracing():
            return "split"
        if self.hidden_path in ("auto", "covariance") and covariance_applies(
            self.norm2, u, self.hidden_dim, self.act_dim, forced=self.hidden_path == "covariance"
        ):
            return "covariance"
        return "explicit" if fused_hidden_applies(u, self.norm2, self.act) else "split"

    @torch.jit.unused
    def _split_hidden(self, u: Tensor) -> Tensor:
        """The hidden layer as two channel groups, never concatenated.

        Active and idle channels go through their own rows of fc1, their own channels of BN2 (views of
        its parameters and running statistics, so the module's state is updated exactly as by one
        BatchNorm over all ``h`` channels), and their own columns of fc2, accumulated into one output.
        This saves the ``(B*N, h)`` copy that joining the two groups would cost in every forward.
        """
        a = self.act_dim
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        norm = channel_group_batch_norm(self.norm2)
        active = norm(self.act(F.linear(u, w1[:a], None if b1 is None else b1[:a])), slice(0, a))  # (M, a)
        idle = norm(F.linear(u, w1[a:], None if b1 is None else b1[a:]), slice(a, None))  # (M, h - a)
        y = F.linear(active, w2[:, :a], b2)  # (M, C)
        return _accumulate(y, idle, w2[:, a:].t())

    # ---- reparameterization -------------------------------------------------------------
    def fold(self, layer_scale: Tensor | None = None) -> FoldedIdleFFN:
        """Fold BN1, BN2, the idle path and the residual (float64). Uses running statistics."""
        if self.feature_norm != "BatchNorm":
            raise layernorm_fold_error("an FFN")
        return fold_idle_ffn(
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            BNStats.from_module(self.norm1),
            BNStats.from_module(self.norm2),
            self.act_dim,
            layer_scale=self._branch_scale(layer_scale),
        )

    def _branch_scale(self, layer_scale: Tensor | None) -> Tensor | None:
        """The per-channel factor on the FFN branch: ``layer_scale / skip_lam`` (None when it is 1)."""
        if self.skip_lam == 1.0:
            return layer_scale
        w = self.fc2.weight
        inv = torch.full((self.dim,), 1.0 / self.skip_lam, dtype=torch.float64, device=w.device)
        return inv if layer_scale is None else inv * layer_scale.detach().to(torch.float64)

    @torch.no_grad()
    def fuse(self) -> FusedIdleMlp:
        """Return the equivalent inference module (timm's ``fuse()`` protocol)."""
        fused = FusedIdleMlp(
            self.dim, self.act_dim, has_linear=self.act_dim < self.hidden_dim, hidden_dim=self.hidden_dim
        )
        fused.load_folded(self.fold(), dtype=self.fc1.weight.dtype, device=self.fc1.weight.device)
        return fused


class FusedIdleMlp(nn.Module):
    """Reparameterized channel-idle FFN, residual included. Inference only.

    Parameters (our deploy layout):
        ``in_proj``: ``Linear(C, C + a)`` whose first ``C`` rows are ``W_lin`` (idle path plus
            identity) and last ``a`` rows ``W_act``; ``Linear(C, a)`` when nothing idles
            (``has_linear=False``), ``Linear(C, C)`` when everything idles (``a == 0``).
        ``out_proj``: ``Linear(a, C)``; without bias unless ``has_linear=False`` (then it carries
            the output bias and the residual stays an identity add). Absent when ``a == 0``.
    """

    def __init__(self, dim: int, act_dim: int, has_linear: bool = True, hidden_dim: int = 0) -> None:
        super().__init__()
        if act_dim == 0 and not has_linear:
            raise UserError("a fused FFN needs a linear branch when no channel is activated")
        self.dim, self.act_dim, self.has_linear = dim, act_dim, has_linear
        # the training form's hidden width h (kept for messages and checkpoint checks; 0: unknown)
        self.hidden_dim = hidden_dim if hidden_dim else (act_dim if not has_linear else 0)
        lin_dim = dim if has_linear else 0
        self.in_proj = nn.Linear(dim, lin_dim + act_dim)
        self.out_proj = nn.Linear(act_dim, dim, bias=not has_linear) if act_dim > 0 else None
        self.act = nn.GELU()
        # When True, the identity is kept out of W_lin (in_proj holds W_lin - I) and x is added
        # separately: better int8 ranges for quantized weights (see repavit.quantize).
        self.identity_separate = False
        # Set by split_products() (export for int8 quantizers): separate Linear layers, no slices.
        self.plain_products = False
        self.training = False

    def extra_repr(self) -> str:
        extra = ", identity_separate=True" if self.identity_separate else ""
        return f"dim={self.dim}, act_dim={self.act_dim}, has_linear={self.has_linear}{extra}"

    @torch.no_grad()
    def separate_identity(self) -> None:
        """Move the residual identity out of ``W_lin`` into an explicit add (same function)."""
        if self.has_linear and not self.identity_separate:
            self.in_proj.weight[: self.dim].sub_(
                torch.eye(self.dim, dtype=self.in_proj.weight.dtype, device=self.in_proj.weight.device)
            )
            self.identity_separate = True

    @torch.no_grad()
    def split_products(self) -> None:
        """Compute with three plain linear layers (``lin_proj``, ``act_proj``, ``out_proj``) and one add.

        Same function. For exports that int8 quantizers read (ONNX Runtime, NNCF): the BLAS path's row
        slices of ``in_proj`` export as Slice nodes and its accumulating GEMM takes an activation as addend,
        and quantizers leave both in float; plain layers with constant weights they quantize.
        """
        if self.plain_products or not self.has_linear or self.out_proj is None:
            return
        c, w, b = self.dim, self.in_proj.weight, self.in_proj.bias
        self.lin_proj = nn.Linear(c, c).to(w)
        self.act_proj = nn.Linear(c, self.act_dim).to(w)
        self.lin_proj.weight.copy_(w[:c])
        self.lin_proj.bias.copy_(b[:c])
        self.act_proj.weight.copy_(w[c:])
        self.act_proj.bias.copy_(b[c:])
        self.plain_products = True

    def train(self, mode: bool = True) -> FusedIdleMlp:
        if mode:
            raise RuntimeError(
                "this FFN is reparameterized (inference only) and cannot be trained; train the training-form "
                "model and reparameterize it afterwards"
            )
        return super().train(False)

    @torch.no_grad()
    def load_folded(self, folded: FoldedIdleFFN, dtype: torch.dtype | None = None, device=None) -> None:
        """Copy folded float64 matrices into this module's parameters."""
        f = folded.to(dtype or self.in_proj.weight.dtype, device or self.in_proj.weight.device)
        a, c = f.act_dim, self.dim
        if a != self.act_dim or f.w_act.shape[1] != c:
            raise UserError(
                f"folded FFN has act_dim {a} and dim {f.w_act.shape[1]}, module expects {self.act_dim}, {c}"
            )
        if (f.w_lin is not None) != self.has_linear:
            raise UserError("folded FFN and module disagree on whether a linear (idle) branch exists")
        self.to(dtype=f.b_lin.dtype, device=f.b_lin.device)
        if self.has_linear:
            self.in_proj.weight.copy_(torch.cat((f.w_lin, f.w_act), 0))
            self.in_proj.bias.copy_(torch.cat((f.b_lin, f.b_act), 0))
        else:
            self.in_proj.weight.copy_(f.w_act)
            self.in_proj.bias.copy_(f.b_act)
            self.out_proj.bias.copy_(f.b_lin)
        if self.out_proj is not None:
            self.out_proj.weight.copy_(f.w_out)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.dim)  # (M, C)
        if torch.jit.is_scripting():
            out = self._forward_blas(x2)
        elif self.plain_products:
            out = self.lin_proj(x2) + self.out_proj(self.act(self.act_proj(x2)))
        elif isinstance(self.in_proj, nn.Linear) and isinstance(self.out_proj, (nn.Linear, type(None))):
            out = self._forward_blas(x2)
        else:  # e.g. dynamically quantized linears
            out = self._forward_modules(x2)
        if self.identity_separate:
            out = out.add_(x2)
        return out.reshape(shape)

    def _forward_blas(self, x2: Tensor) -> Tensor:
        """Every product accumulates into one output buffer: no separate add, no copy of a branch.

        ``out = b_lin + x W_lin^T`` (bias broadcast by addmm), then ``out += GELU(x W_act^T + b_act) W_out^T``
        in place (addmm_ with beta=1). ``W_lin``/``W_act`` are row slices of ``in_proj.weight``
        (contiguous views). Measured on CPU this beats one wide GEMM for ``[W_lin; W_act]`` followed by
        an addmm on the strided linear half, which makes BLAS copy that half first.
        """
        w, b, c = self.in_proj.weight, self.in_proj.bias, self.dim
        assert b is not None
        out_proj = self.out_proj
        if out_proj is None:  # a == 0: one linear map
            return torch.addmm(b, x2, w.t())
        if not self.has_linear:  # nothing idles: out = x + b_out + GELU(x W_act^T + b_act) W_out^T
            b_out = out_proj.bias
            assert b_out is not None
            out = torch.addmm(b_out, self.act(torch.addmm(b, x2, w.t())), out_proj.weight.t())
            return out.add_(x2)
        out = torch.addmm(b[:c], x2, w[:c].t())  # (M, C): linear branch with the identity folded in
        act = self.act(torch.addmm(b[c:], x2, w[c:].t()))  # (M, a)
        return _accumulate(out, act, out_proj.weight.t())

    def _forward_modules(self, x2: Tensor) -> Tensor:
        """Generic path through the submodules (e.g. dynamically quantized linears)."""
        t = self.in_proj(x2)  # (M, C + a), or (M, a) when nothing idles
        if self.act_dim == 0:
            return t
        if not self.has_linear:
            return x2 + self.out_proj(self.act(t))
        return t[:, : self.dim] + self.out_proj(self.act(t[:, self.dim :]))


def channel_group_batch_norm(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[Tensor, slice], Tensor]:
    """``norm(z, s)``: ``bn`` applied to ``z``, the channels ``s`` of its input (channel axis 1).

    Uses views of ``bn``'s parameters and running statistics, so normalizing the channel groups
    separately computes and updates exactly what one call on the concatenated channels would.
    Call this once per forward: in training it advances ``num_batches_tracked`` once.
    """
    use_batch_stats = bn.training or bn.running_mean is None
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm does
            momentum = 1.0 / float(bn.num_batches_tracked)

    def norm(z: Tensor, s: slice) -> Tensor:
        rm = None if bn.running_mean is None else bn.running_mean[s]
        rv = None if bn.running_var is None else bn.running_var[s]
        w = None if bn.weight is None else bn.weight[s]
        b = None if bn.bias is None else bn.bias[s]
        return F.batch_norm(z, rm, rv, w, b, use_batch_stats, momentum, bn.eps)

    return norm


def _accumulate(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out + a @ b``: in place (no new buffer), except under autocast, which only casts out-of-place ops,
    and under TorchScript and FX tracing, which want the functional op."""
    if torch.jit.is_scripting():
        return torch.addmm(out, a, b)
    else:
        kind = "meta" if is_fx_symbolic_tracing() else out.device.type
        if kind == "meta" or torch.is_autocast_enabled(kind):  # autocast has no "meta" device type
            return torch.addmm(out, a, b)
        return out.addmm_(a, b)


def set_hidden_path(model: nn.Module, path: str) -> int:
    """Set ``hidden_path`` (``HIDDEN_PATHS``) on every channel-idle FFN in ``model``; returns how many."""
    check_hidden_path(path)
    n = 0
    for m in model.modules():
        if isinstance(getattr(type(m), "hidden_path", None), str):
            m.hidden_path, n = path, n + 1
    return n


def reparameterize_module(module: nn.Module) -> int:
    """Replace every :class:`ChannelIdleMlp`-like child (anything with ``fuse()``) in place.

    Returns the number of modules fused.
    """
    count = 0
    for name, child in list(module.named_children()):
        if hasattr(child, "fuse") and callable(child.fuse):
            setattr(module, name, child.fuse())
            count += 1
        else:
            count += reparameterize_module(child)
    return count
