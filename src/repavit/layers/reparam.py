"""Model-level reparameterization protocol shared by the RePa families (Swin, PoolFormer, MLP-Mixer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError
from .idle_conv_mlp import FusedIdleConvMlp
from .idle_mlp import FusedIdleMlp, reparameterize_module

__all__ = ["FUSED_TYPES", "ReparamMixin", "check_reparameterizable", "check_static_heuristic", "take_indices"]

FUSED_TYPES = (FusedIdleMlp, FusedIdleConvMlp)


class ReparamMixin:
    """``reparameterized``, ``reparameterize()`` and a ``train()`` that refuses fused models.

    Mix into an ``nn.Module`` that sets ``self.feature_norm``; put it before ``nn.Module`` in the bases.
    (No class-level annotations here: TorchScript would try to compile them.)
    """

    # Python-side metadata that TorchScript must not compile
    __jit_unused_properties__ = ("feature_info", "reparameterized", "stages")

    @property
    def reparameterized(self) -> bool:
        """True once any FFN is in its fused inference form."""
        return any(isinstance(m, FUSED_TYPES) for m in self.modules())

    def _reset_head(self, num_classes: int, global_pool: str | None, pools: Sequence[str], in_features: int) -> None:
        """timm's ``reset_classifier``: a new ``head`` with the model's device, dtype and train/eval mode."""
        if global_pool is not None:
            if global_pool not in pools:
                raise UserError(f"unknown global_pool {global_pool!r}; expected one of {', '.join(map(repr, pools))}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = next(self.parameters(), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        head = torch.nn.Linear(in_features, num_classes, **factory) if num_classes > 0 else torch.nn.Identity()
        self.head = head.train(self.training)

    def train(self, mode: bool = True):
        if mode and self.reparameterized:
            raise RuntimeError(
                "this model is reparameterized (inference only) and cannot be trained; train the training-form "
                "model and reparameterize it afterwards"
            )
        return super().train(mode)

    @torch.no_grad()
    def reparameterize(self):
        """Fold every FFN in place (idempotent) and switch to eval mode. Returns ``self``."""
        if self.feature_norm != "BatchNorm":
            raise UserError(
                "cannot reparameterize a feature_norm='LayerNorm' model: LayerNorm normalizes each token by its "
                "own statistics, which no fixed matrix can absorb; train with feature_norm='BatchNorm'"
            )
        self.eval()
        reparameterize_module(self)
        return self


def check_reparameterizable(feature_norm: str, reparameterized: bool) -> None:
    """Refuse ``reparameterized=True`` for a LayerNorm model (it has no fused form)."""
    if reparameterized and feature_norm != "BatchNorm":
        raise UserError("reparameterized=True needs feature_norm='BatchNorm': a LayerNorm FFN has no fused form")


def take_indices(num: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """Absolute feature indices to return, and the largest (timm's ``feature_take_indices`` convention).

    ``None``: all ``num``; an int ``n``: the last ``n``; a sequence: those indices (negative count from the end).
    """
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise UserError(f"cannot take the last {indices} features: expected 1 to {num}")
        taken = list(range(num - indices, num))
    else:
        taken = []
        for i in indices:
            idx = num + i if i < 0 else i
            if not 0 <= idx < num:
                raise UserError(f"feature index {i} is out of range: expected -{num} to {num - 1}")
            taken.append(idx)
        if not taken:
            raise UserError("no feature indices given: expected at least one")
    return taken, max(taken)


def check_static_heuristic(heuristic: str, family: str) -> str:
    """Accept only the constant idle-ratio schedule (``"static"``, or the authors' aliases ``"none"``/``""``).

    The per-block ``"linear"`` schedule exists for RePaViT only; the authors' other families ignore
    the argument, which would silently train a different model than asked for.
    """
    if heuristic in ("static", "none", ""):
        return "static"
    raise UserError(f"{family} supports only heuristic='static' (a constant idle ratio), got {heuristic!r}")
