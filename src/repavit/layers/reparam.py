"""Model-level reparameterization protocol shared by the RePa families (Swin, PoolFormer, MLP-Mixer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError
from .idle_conv_mlp import FusedIdleConvMlp
from .idle_mlp import (
    LAYERNORM_CANNOT_FOLD,
    FusedIdleMlp,
    check_feature_norm,
    check_idle_ratio,
    check_static_heuristic,
    layernorm_fold_error,
    reparameterize_module,
)

__all__ = ["FUSED_TYPES", "ReparamMixin", "check_ffn_settings", "check_reparameterizable"]

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
            raise layernorm_fold_error("a model")
        self.eval()
        reparameterize_module(self)
        return self


def check_reparameterizable(feature_norm: str, reparameterized: bool) -> None:
    """Refuse ``reparameterized=True`` for a LayerNorm model (it has no fused form)."""
    if reparameterized and feature_norm != "BatchNorm":
        raise UserError(f"reparameterized=True needs feature_norm='BatchNorm': {LAYERNORM_CANNOT_FOLD}")


def check_ffn_settings(
    feature_norm: str, idle_ratio: float, reparameterized: bool, heuristic: str | None = None, family: str = ""
) -> str | None:
    """Validate a model's FFN settings (one-line errors); return the heuristic as stored (``"static"``).

    ``heuristic=None``: the family has per-block schedules of its own (RePaViT checks it itself);
    otherwise only the constant schedule is accepted (see :func:`check_static_heuristic`).
    """
    check_feature_norm(feature_norm)
    check_idle_ratio(idle_ratio)
    check_reparameterizable(feature_norm, reparameterized)
    return None if heuristic is None else check_static_heuristic(heuristic, family)
