"""Registering a family's variants in timm under the authors' names and timm-style aliases.

Besides timm's registry this keeps two tables the checkpoint readers use: which registered names
are one architecture (``RePaViT_Tiny`` and ``repavit_tiny_patch16_224``), and each family's
function that names the variant a state dict's shapes belong to.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from torch import Tensor

# registered name -> (family module, size key): names with the same value are one architecture
ARCHITECTURE: dict[str, tuple[str, str]] = {}
# per family: state dict -> the authors' name of the variant its shapes belong to, or None
IDENTIFIERS: list[Callable[[Mapping[str, Tensor]], str | None]] = []


def register_variants(
    module: str,
    names: Mapping[str, str],
    create: Callable,
    describe: Callable[[str], str],
    identify: Callable[[Mapping[str, Tensor]], str | None] | None = None,
) -> None:
    """Register one timm entry point per name, each calling ``create(name, pretrained=..., **kwargs)``.

    Args:
        module: the family's ``__name__``; the entry points are placed there so that timm files them
            under that family (``timm.list_models(module="repaswin")``).
        names: registered name -> size key (names sharing a key are aliases of one architecture).
        create: builds a variant.
        describe: gives each entry point's docstring.
        identify: names the variant a state dict belongs to from its shapes (for files without a record).
    """
    namespace = vars(sys.modules[module])
    if identify is not None:
        IDENTIFIERS.append(identify)
    for name in names:
        ARCHITECTURE[name] = (module, names[name])

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


def same_architecture(a: str, b: str) -> bool:
    """True when two registered names build the same architecture (an authors' name and its timm alias)."""
    a, b = a.split(".")[0], b.split(".")[0]
    return a == b or (a in ARCHITECTURE and ARCHITECTURE.get(a) == ARCHITECTURE.get(b))


def identify_variant(state_dict: Mapping[str, Tensor]) -> str | None:
    """The registered variant a state dict's shapes belong to (first family that recognizes it), or None."""
    for identify in IDENTIFIERS:
        name = identify(state_dict)
        if name:
            return name
    return None
