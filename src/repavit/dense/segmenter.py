"""UperNet (Xiao et al., 2018) with a RePa backbone, for semantic segmentation.

Why our own head and not the one in ``transformers``: that one takes its backbones through the
``transformers`` backbone API (a timm model only by hub name, with its own features wrapper), brings a
large dependency, and its checkpoints are not ours; the head itself is small. This one is the
MMSegmentation UperNet the paper used, in its published structure: a pyramid pooling module (scales 1, 2,
3, 6) on the stride-32 map, 1x1 lateral convolutions and a top-down FPN path, 3x3 output convolutions,
all levels upsampled to stride 4, concatenated, fused by a 3x3 convolution, then a 1x1 classifier; every
convolution is conv-BN-ReLU. The auxiliary FCN head of the paper's recipe (loss weight 0.4 on stride 16)
is left out: it only helps training and is dropped at inference.

Inference modes (``SegmenterConfig.inference``): ``"whole"`` runs the image as it is (any size: the
backbones pad); ``"slide"`` runs ``crop`` x ``crop`` windows with stride ``stride`` and averages the
logits where windows overlap, as MMSegmentation's ADE20K configs (512 crop, 341 stride) do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .backbone import DenseBackbone, backbone_family, build_backbone
from .detectors import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SegmenterConfig", "UperNet", "build_segmenter"]

INFERENCE_MODES = ("whole", "slide")


@dataclass
class SegmenterConfig:
    """What builds a segmenter; saved in its checkpoints (``dense`` entry)."""

    model: str
    num_classes: int
    class_names: list[str] | None = None
    channels: int = 512
    bn: str = "frozen"
    crop_size: int = 512
    inference: str = "whole"
    stride: int = 341
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    task: str = "segmentation"

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise UserError(f"num_classes={self.num_classes!r}: expected a positive number of classes")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise UserError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.channels < 1:
            raise UserError(f"channels={self.channels}: expected at least 1")
        if self.inference not in INFERENCE_MODES:
            raise UserError(f"unknown inference mode {self.inference!r}: expected 'whole' or 'slide'")
        if not 0 < self.stride <= self.crop_size:
            raise UserError(f"sliding stride {self.stride} for crop {self.crop_size}: expected 0 < stride <= crop")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterConfig:
        if not isinstance(data, dict) or data.get("task") != "segmentation":
            raise UserError("the checkpoint holds no segmenter (its 'dense' entry is missing or not a segmenter's)")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class UperHead(nn.Module):
    """PPM + FPN fusion over four levels (strides 4-32) -> logits at stride 4."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, scales=(1, 2, 3, 6)) -> None:
        super().__init__()
        top = in_channels[-1]
        self.scales = scales
        self.ppm = nn.ModuleList([_cbr(top, channels, 1) for _ in scales])
        self.bottleneck = _cbr(top + len(scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([_cbr(c, channels, 1) for c in in_channels[:-1]])
        self.fpn = nn.ModuleList([_cbr(channels, channels, 3) for _ in in_channels[:-1]])
        self.fuse = _cbr(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        top = feats[-1]
        pooled = [top] + [
            F.interpolate(conv(F.adaptive_avg_pool2d(top, s)), size=top.shape[2:], mode="bilinear", align_corners=False)
            for s, conv in zip(self.scales, self.ppm)
        ]
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:-1])] + [self.bottleneck(torch.cat(pooled, 1))]
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + F.interpolate(
                levels[i], size=levels[i - 1].shape[2:], mode="bilinear", align_corners=False
            )
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        return self.cls(self.dropout(self.fuse(torch.cat(outs, 1))))


class UperNet(nn.Module):
    """``forward(images in [0, 1]) -> logits (B, K, H, W)`` at the input size (normalization inside)."""

    def __init__(self, backbone: DenseBackbone, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.head = UperHead(backbone.out_channels, cfg.channels, cfg.num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.mean) / self.std
        logits = self.head(list(self.backbone(x).values()))
        return F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        """One image ``(3, H, W)`` -> logits ``(K, H, W)``, by the config's inference mode."""
        if self.cfg.inference == "whole":
            return self(image[None])[0]
        return self._slide(image)

    def _slide(self, image: Tensor) -> Tensor:
        crop, stride = self.cfg.crop_size, self.cfg.stride
        _, H, W = image.shape
        logits = image.new_zeros(self.cfg.num_classes, H, W)
        count = image.new_zeros(1, H, W)
        rows = max(H - crop + stride - 1, 0) // stride + 1  # MMSegmentation's grid
        cols = max(W - crop + stride - 1, 0) // stride + 1
        for i in range(rows):
            for j in range(cols):
                y0, x0 = min(i * stride, max(H - crop, 0)), min(j * stride, max(W - crop, 0))
                window = image[:, y0 : y0 + crop, x0 : x0 + crop]
                h, w = window.shape[1:]
                if self.backbone.family == "vit" and (h, w) != (crop, crop):  # a ViT takes crop x crop only
                    out = self(F.pad(window, (0, crop - w, 0, crop - h))[None])[0, :, :h, :w]
                else:
                    out = self(window[None])[0]
                logits[:, y0 : y0 + h, x0 : x0 + w] += out
                count[:, y0 : y0 + h, x0 : x0 + w] += 1
        return logits / count


def build_segmenter(cfg: SegmenterConfig, pretrained: str | None = None) -> UperNet:
    kwargs = dict(cfg.model_kwargs)
    if backbone_family(cfg.model) == "vit":
        kwargs.setdefault("img_size", cfg.crop_size)
        if cfg.inference != "slide":
            raise UserError("a ViT backbone takes one input size: segment with --inference slide")
    body = build_backbone(cfg.model, pretrained=pretrained, bn=cfg.bn, model_kwargs=kwargs)
    return UperNet(body, cfg)
