"""``RePaBackbone`` inside MMDetection and MMSegmentation models (repavit.dense.mmdet).

Needs mmdet 3.3 and mmseg 1.2 with a full mmcv (compiled ops) in ``[2.0.0rc4, 2.2.0)``, which has to be built
from source beside torch 2.14 (see docs/dense.md). The project's CI does not install them, so there this
whole file is skipped (accepted); run it in an environment that has them.
"""

from __future__ import annotations

import copy
import pickle
import sys

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet not installed (needs a from-source mmcv < 2.2 beside torch 2.14)")

from mmengine.config import ConfigDict

from repavit.dense.mmdet import register_mmdet, register_mmseg, reparameterize_mm_model
from repavit.errors import MissingExtraError

from helpers import randomize_bn, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))  # levels: 24, 48, 96, 192 channels


def _backbone(out_indices: tuple[int, ...]) -> dict:
    return dict(
        type="RePaBackbone", model_name="RePaSwin_Tiny", out_indices=out_indices, bn="frozen", model_kwargs=TINY
    )


def _retinanet() -> torch.nn.Module:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    register_mmdet()
    cfg = dict(
        type="RetinaNet",
        backbone=_backbone((1, 2, 3)),
        neck=dict(
            type="FPN",
            in_channels=[48, 96, 192],
            out_channels=32,
            start_level=0,
            add_extra_convs="on_input",
            num_outs=5,
        ),
        bbox_head=dict(
            type="RetinaHead",
            num_classes=3,
            in_channels=32,
            stacked_convs=1,
            feat_channels=32,
            anchor_generator=dict(
                type="AnchorGenerator",
                octave_base_scale=4,
                scales_per_octave=3,
                ratios=[0.5, 1.0, 2.0],
                strides=[8, 16, 32, 64, 128],
            ),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5)),
    )
    return MODELS.build(ConfigDict(cfg))


def _upernet() -> torch.nn.Module:
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    register_mmseg()
    cfg = dict(
        type="EncoderDecoder",
        backbone=_backbone((0, 1, 2, 3)),
        decode_head=dict(
            type="UPerHead",
            in_channels=[24, 48, 96, 192],
            in_index=[0, 1, 2, 3],
            pool_scales=(1, 2, 3, 6),
            channels=32,
            dropout_ratio=0.1,
            num_classes=4,
            norm_cfg=dict(type="BN", requires_grad=True),
            align_corners=False,
            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        ),
        test_cfg=dict(mode="whole"),
    )
    return MODELS.build(ConfigDict(cfg))


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out for t in _flat(part)]


@torch.no_grad()
def _check_fold(model: torch.nn.Module, dtype: torch.dtype, tol: float) -> None:
    model = copy.deepcopy(model).to(dtype).eval()
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = _flat(model(x, mode="tensor"))
    assert reparameterize_mm_model(model) == 1
    assert model.backbone.reparameterized
    assert reparameterize_mm_model(model) == 0  # already folded
    out = _flat(model(x, mode="tensor"))
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert rel_err(a, b) < tol, (dtype, rel_err(a, b))


@pytest.fixture(scope="module")
def retinanet() -> torch.nn.Module:
    model = _retinanet()
    model.init_weights()
    randomize_bn(model.backbone)
    return model


@pytest.fixture(scope="module")
def upernet() -> torch.nn.Module:
    model = _upernet()
    model.init_weights()
    randomize_bn(model.backbone)
    return model


def test_retinanet_tensor_forward(retinanet):
    bb = retinanet.backbone
    assert type(bb).__name__ == "RePaBackbone" and bb.out_channels == [48, 96, 192] and bb.strides == [8, 16, 32]
    with torch.no_grad():
        cls, reg = retinanet.eval()(torch.rand(1, 3, 96, 96), mode="tensor")
    assert [tuple(c.shape) for c in cls] == [(1, 27, s, s) for s in (12, 6, 3, 2, 1)]
    assert [tuple(r.shape) for r in reg] == [(1, 36, s, s) for s in (12, 6, 3, 2, 1)]


def test_retinanet_frozen_bn_stays_eval(retinanet):
    model = copy.deepcopy(retinanet).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert model.backbone.training and model.neck.training


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_retinanet_fold_exact(retinanet, dtype, tol):
    _check_fold(retinanet, dtype, tol)


def test_upernet_tensor_forward(upernet):
    with torch.no_grad():
        out = upernet.eval()(torch.rand(1, 3, 96, 96), mode="tensor")
    assert tuple(out.shape) == (1, 4, 24, 24)  # UPerHead predicts at the stride-4 level


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_upernet_fold_exact(upernet, dtype, tol):
    _check_fold(upernet, dtype, tol)


def test_register_idempotent():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    cls = register_mmdet()
    assert register_mmdet() is cls and register_mmseg() is cls and register_mmseg() is cls
    assert DET.module_dict["RePaBackbone"] is cls and SEG.module_dict["RePaBackbone"] is cls
    assert DET.get("RePaBackbone") is cls and SEG.get("RePaBackbone") is cls
    from mmengine.model import BaseModule

    import repavit.dense.mmdet as mm

    assert issubclass(cls, BaseModule) and mm.RePaBackbone is cls
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_missing_mmdet_is_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmdet.registry", None)
    with pytest.raises(MissingExtraError, match=r"mmcv >= 2\.0\.0rc4, < 2\.2\.0 .*docs/dense\.md"):
        register_mmdet()
