"""Registering a family's variants in timm under the authors' names and timm-style aliases."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model


def register_variants(module: str, names: Iterable[str], create: Callable, describe: Callable[[str], str]) -> None:
    """Register one timm entry point per name, each calling ``create(name, pretrained=..., **kwargs)``.

    The entry points are placed in ``module`` (a family's ``__name__``) so that timm files them under
    that family (``timm.list_models(module="repaswin")``); ``describe(name)`` gives each docstring.
    """
    namespace = vars(sys.modules[module])
    for name in names:

        def entrypoint(pretrained: bool = False, _name: str = name, **kwargs):
            return create(_name, pretrained=pretrained, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = module
        entrypoint.__doc__ = describe(name)
        namespace[name] = register_model(entrypoint)


def repa_cfg(first_conv: str, pool_size: tuple[int, int] | None, fixed_input_size: bool, **kwargs) -> dict:
    """A timm pretrained config with what every RePa family shares (ImageNet-1k, DeiT preprocessing, paper)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": pool_size,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": fixed_input_size,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2505.21847",
        "paper_name": "RePaViT: Scalable Vision Transformer Acceleration via Structural Reparameterization "
        "on Feedforward Network Layers",
        "origin_url": "https://github.com/Ackesnal/RePaViT",
        **kwargs,
    }
