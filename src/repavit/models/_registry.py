"""Registering a family's variants in timm under the authors' names and timm-style aliases."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

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
