"""``create_model`` and ``reparameterize_model``: the package's two main entry points."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import timm
from torch import nn

from ..layers.idle_mlp import reparameterize_module
from ._checkpoint import load_checkpoint, read_checkpoint, unwrap_state_dict


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every channel-idle FFN of ``model`` into its inference form and switch to eval mode.

    Works on any module tree holding RePa FFNs (RePa models, or RePa blocks inside another
    network). Idempotent. With ``inplace=False`` (default) the original is left untouched and a
    folded deep copy is returned; parameters keep their device and dtype either way.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    else:
        model.eval()
        reparameterize_module(model)
    return model


def _is_training_form(state_dict: Mapping[str, Any]) -> bool:
    return any(k.endswith(("mlp.norm1.running_mean", "mlp.norm2.running_mean")) for k in state_dict)


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    reparameterized: bool = False,
    use_ema: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally load a checkpoint, optionally in its fused form.

    Args:
        model_name: any name registered in timm, e.g. ``"RePaViT_Base"`` or ``"repavit_base_patch16_224"``.
        pretrained: load the model's released weights through timm's ``pretrained_cfg``.
        checkpoint_path: a local ``.pth``/``.pt``/``.safetensors`` file in the authors' layout or ours,
            training form or reparameterized.
        reparameterized: return the fused inference model. A training-form checkpoint is loaded
            into the training form first and folded afterwards; a fused checkpoint loads directly.
        use_ema: take the ``model_ema`` weights of a training checkpoint.
        **kwargs: model arguments (``idle_ratio``, ``feature_norm``, ``num_classes``, ...).
    """
    if ":" not in model_name and not timm.is_model(model_name.split(".")[0]):
        raise ValueError(f"unknown model {model_name!r}; see `timm.list_models('*RePa*')` for the registered names")
    state = None
    if checkpoint_path is not None:
        state = unwrap_state_dict(read_checkpoint(checkpoint_path), use_ema=use_ema)
    build_fused = reparameterized and not (state is not None and _is_training_form(state)) and not pretrained
    model = timm.create_model(model_name, pretrained=pretrained, reparameterized=build_fused, **kwargs)
    if state is not None:
        load_checkpoint(model, state)
    if reparameterized and not build_fused:
        reparameterize_model(model, inplace=True)
    return model
