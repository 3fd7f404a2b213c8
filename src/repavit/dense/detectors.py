"""torchvision's RetinaNet, Mask R-CNN and FCOS with a RePa backbone and an FPN.

Why torchvision: its detection models are maintained, pure PyTorch (the compiled NMS and RoIAlign ship
in torchvision's wheel) and run on the CPU beside our pinned torch; MMDetection 3.3 does not install
beside it (``docs/dense.md`` records the attempt). The necks follow the paper's detectors:

* RetinaNet and FCOS: FPN on the stride 8-32 maps (P3-P5) plus P6/P7 from P5, 256 channels.
* Mask R-CNN: FPN on the stride 4-32 maps (P2-P5) plus a max-pooled P6 for the RPN, 256 channels.

Classes are ``1..K`` (0 is the background, torchvision's convention); the dataset maps COCO category
ids to them. Input images are ``[0, 1]`` RGB; the detector's transform normalizes them with the
ImageNet mean and std and resizes them (``min_size``/``max_size``, or to ``fixed_size`` for ViT
backbones, whose position embedding has one size).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..errors import UserError
from .backbone import DenseBackbone, backbone_family, build_backbone

__all__ = ["DETECTORS", "DetectorConfig", "WithFPN", "build_detector"]

DETECTORS = ("retinanet", "maskrcnn", "fcos")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class DetectorConfig:
    """Everything that builds a detector; saved in its checkpoints (``dense`` entry) and checked on load."""

    detector: str
    model: str
    num_classes: int
    class_names: list[str] | None = None
    min_size: int = 800
    max_size: int = 1333
    fpn_channels: int = 256
    bn: str = "frozen"
    rois_per_image: int = 512
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    task: str = "detection"

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise UserError(f"unknown detector {self.detector!r}: expected one of {', '.join(DETECTORS)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise UserError(f"num_classes={self.num_classes!r}: expected a positive number of object classes")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise UserError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.fpn_channels < 1:
            raise UserError(f"fpn_channels={self.fpn_channels}: expected at least 1")
        vit = backbone_family(self.model) == "vit"
        if vit and self.min_size % 32:
            raise UserError(
                f"a ViT backbone takes one square input: --min-size {self.min_size} must be a multiple of 32"
            )
        if vit and self.model_kwargs.get("img_size", self.min_size) != self.min_size:
            raise UserError(
                f"img_size={self.model_kwargs['img_size']} differs from --min-size {self.min_size}: a ViT "
                "backbone's input is --min-size (leave img_size out)"
            )
        if self.rois_per_image < 1:
            raise UserError(f"rois_per_image={self.rois_per_image}: expected at least 1")
        if not 32 <= self.min_size <= self.max_size:
            raise UserError(f"image sizes min {self.min_size}, max {self.max_size}: expected 32 <= min <= max")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        if not isinstance(data, dict) or data.get("task") != "detection":
            raise UserError("the checkpoint holds no detector (its 'dense' entry is missing or not a detector's)")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class WithFPN(nn.Module):
    """Backbone levels -> FPN maps, with the ``out_channels`` attribute torchvision's detectors read."""

    def __init__(self, body: DenseBackbone, out_channels: int, extra: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def build_detector(cfg: DetectorConfig, pretrained: str | None = None) -> nn.Module:
    """A torchvision detector with the config's backbone (random, or ``pretrained`` ImageNet weights)."""
    from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    kwargs = dict(cfg.model_kwargs)
    vit = backbone_family(cfg.model) == "vit"
    if vit:
        kwargs.setdefault("img_size", cfg.min_size)
    levels = (0, 1, 2, 3) if cfg.detector == "maskrcnn" else (1, 2, 3)
    body = build_backbone(cfg.model, pretrained=pretrained, bn=cfg.bn, out_indices=levels, model_kwargs=kwargs)
    c = cfg.fpn_channels
    extra = LastLevelMaxPool() if cfg.detector == "maskrcnn" else LastLevelP6P7(c, c)
    backbone = WithFPN(body, c, extra)
    size = dict(min_size=cfg.min_size, max_size=cfg.max_size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    if vit:
        size["fixed_size"] = (cfg.min_size, cfg.min_size)
    n = cfg.num_classes + 1  # with the background
    if cfg.detector == "maskrcnn":
        return MaskRCNN(backbone, num_classes=n, box_batch_size_per_image=cfg.rois_per_image, **size)
    if cfg.detector == "fcos":
        return FCOS(backbone, num_classes=n, **size)
    anchors = AnchorGenerator(
        tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512)),
        ((0.5, 1.0, 2.0),) * 5,
    )
    return RetinaNet(backbone, num_classes=n, anchor_generator=anchors, **size)


def detector_backbone(model: nn.Module) -> DenseBackbone:
    """The :class:`DenseBackbone` inside a detector built here (or its DDP wrapper)."""
    inner = getattr(model, "module", model)
    return inner.backbone.body
