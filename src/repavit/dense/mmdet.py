"""RePa backbones inside MMDetection 3.x and MMSegmentation 1.x models (optional).

:func:`register_mmdet` and :func:`register_mmseg` register ``RePaBackbone`` in ``mmdet.registry.MODELS``
and ``mmseg.registry.MODELS``; a config then names it like any mm backbone. ``RePaBackbone`` is an
mmengine ``BaseModule`` around :func:`repavit.dense.backbone.build_backbone`: its ``forward`` returns the
tuple of ``NCHW`` maps an mm neck or decode head takes, ``init_weights()`` keeps the weights it was built
with (``pretrained`` is loaded at construction; an mm ``init_cfg``, if given, is applied as mmengine does),
and ``reparameterize()`` folds its RePa FFNs in place. :func:`reparameterize_mm_model` folds every
``RePaBackbone`` of a built detector or segmenter for deployment.

**Install caveat.** Neither mm package is a dependency of repavit. mmdet 3.3 and mmseg 1.2 assert
``mmcv >= 2.0.0rc4, < 2.2.0`` on import and load ``mmcv.ops`` (the compiled ops) as soon as their models
load, so ``mmcv-lite`` is not enough; PyPI has no mmcv wheels for torch 2.14, and the mmcv 2.1.0 sdist must be
built from source (``setuptools<80``, ``--no-build-isolation``, and its setup.py's ``-std=c++17`` changed to
``-std=c++20`` for torch 2.14's headers; see docs/dense.md). Without them the register functions raise
:class:`~repavit.errors.MissingExtraError`.

RetinaNet (``neck.in_channels`` are the backbone's ``out_channels`` for the chosen ``out_indices``:
``RePaSwin_Tiny`` levels 1-3 give ``[192, 384, 768]`` at strides 8, 16, 32)::

    from repavit.dense.mmdet import register_mmdet, reparameterize_mm_model
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import ConfigDict

    register_all_modules()
    register_mmdet()
    model = dict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
        backbone=dict(type="RePaBackbone", model_name="RePaSwin_Tiny", out_indices=(1, 2, 3), bn="frozen",
                      pretrained="repaswin_tiny.safetensors", model_kwargs=dict(drop_path_rate=0.2)),
        neck=dict(type="FPN", in_channels=[192, 384, 768], out_channels=256, start_level=0,
                  add_extra_convs="on_input", num_outs=5),
        bbox_head=dict(type="RetinaHead", num_classes=80, in_channels=256, ...),  # as in retinanet_r50_fpn
    )
    detector = MODELS.build(ConfigDict(model))  # a ConfigDict: the heads read test_cfg by attribute
    ...  # train, then for deployment:
    reparameterize_mm_model(detector)  # exact with the (frozen) running statistics

UperNet (all four levels, ``[96, 192, 384, 768]`` for ``RePaSwin_Tiny``)::

    from repavit.dense.mmdet import register_mmseg

    register_mmseg()
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, size=(512, 512)),
        backbone=dict(type="RePaBackbone", model_name="RePaSwin_Tiny", out_indices=(0, 1, 2, 3), bn="frozen"),
        decode_head=dict(type="UPerHead", in_channels=[96, 192, 384, 768], in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=512, num_classes=150, ...),  # as upernet_r50
    )

In a config file run by mmdet's or mmseg's ``tools/train.py``, call the register function from the script
(or from a module named in the config's ``custom_imports``) before the model is built.
``from repavit.dense.mmdet import RePaBackbone`` gives the class itself (it needs mmengine).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..errors import MissingExtraError

__all__ = ["register_mmdet", "register_mmseg", "reparameterize_mm_model"]

_NAME = "RePaBackbone"
_INSTALL = (
    "mmdet 3.3 (and mmseg 1.2) needs mmcv >= 2.0.0rc4, < 2.2.0 with compiled ops, which must be built from source "
    "beside torch 2.14 (see docs/dense.md)"
)


def _missing(what: str, err: BaseException) -> MissingExtraError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return MissingExtraError(f"{what} is not usable ({reason}): {_INSTALL}")


@functools.cache
def _backbone_class() -> type[nn.Module]:
    """``RePaBackbone``, made on first use so that this module imports without mmengine."""
    try:
        from mmengine.model import BaseModule
    except ImportError as e:
        raise _missing("mmengine", e) from e

    from .backbone import build_backbone

    class RePaBackbone(BaseModule):
        """A RePa (or timm) model's feature pyramid as an mm backbone: ``forward(x) -> (map, ...)``.

        Args are those of :func:`repavit.dense.backbone.build_backbone`, plus mmengine's ``init_cfg``.
        ``out_channels`` and ``strides`` list the returned levels; ``dense`` is the wrapped DenseBackbone.
        """

        def __init__(
            self,
            model_name: str,
            out_indices: tuple[int, ...] = (0, 1, 2, 3),
            bn: str = "frozen",
            pretrained: str | None = None,
            model_kwargs: dict[str, Any] | None = None,
            init_cfg: dict | list[dict] | None = None,
        ) -> None:
            super().__init__(init_cfg=init_cfg)
            self.model_name, self.pretrained = model_name, pretrained
            self.dense = build_backbone(
                model_name, pretrained=pretrained, bn=bn, out_indices=tuple(out_indices), model_kwargs=model_kwargs
            )
            self.out_channels, self.strides = list(self.dense.out_channels), list(self.dense.strides)

        def init_weights(self) -> None:
            """Keep the built weights (random or ``pretrained``); apply an ``init_cfg`` only when one was given."""
            if self.init_cfg:
                super().init_weights()
            else:
                self.is_init = True

        @property
        def reparameterized(self) -> bool:
            return self.dense.reparameterized

        def reparameterize(self) -> RePaBackbone:
            """Fold the RePa FFNs in place (exact with the running statistics, so use eval or ``bn="frozen"``)."""
            self.dense.reparameterize()
            return self

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            return tuple(self.dense(x).values())

    # pickles (and prints) as repavit.dense.mmdet.RePaBackbone, found through the module's __getattr__
    RePaBackbone.__module__, RePaBackbone.__qualname__ = __name__, _NAME
    return RePaBackbone


def __getattr__(name: str) -> Any:
    if name == _NAME:
        return _backbone_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register(package: str) -> type[nn.Module]:
    import importlib

    try:
        registry = importlib.import_module(f"{package}.registry")
        importlib.import_module("mmcv.ops")  # the compiled ops: their models import them
    except (ImportError, AssertionError) as e:  # mmdet/mmseg assert the mmcv version on import
        raise _missing(package, e) from e
    cls = _backbone_class()
    if registry.MODELS.module_dict.get(_NAME) is not cls:
        registry.MODELS.register_module(name=_NAME, module=cls, force=True)
    return cls


def register_mmdet() -> type[nn.Module]:
    """Register ``RePaBackbone`` in ``mmdet.registry.MODELS`` (idempotent) and return the class.

    Raises:
        MissingExtraError: mmdet, or an mmcv with compiled ops in its supported range, is not installed.
    """
    return _register("mmdet")


def register_mmseg() -> type[nn.Module]:
    """Register ``RePaBackbone`` in ``mmseg.registry.MODELS`` (idempotent) and return the class.

    Raises:
        MissingExtraError: mmseg, or an mmcv with compiled ops in its supported range, is not installed.
    """
    return _register("mmseg")


def reparameterize_mm_model(model: nn.Module) -> int:
    """Fold every not yet folded ``RePaBackbone`` inside an mmdet/mmseg model in place; how many were folded.

    Only the backbones change (their FFNs fold with the running statistics, and they switch to eval mode);
    necks and heads are left as they are. A model without mmengine installed cannot hold one: 0.
    """
    try:
        cls = _backbone_class()
    except MissingExtraError:
        return 0
    folded = 0
    for module in model.modules():
        if isinstance(module, cls) and not module.reparameterized:
            module.reparameterize()
            folded += 1
    return folded
