"""Per-image latency of whole detectors and segmenters: vanilla Swin vs RePaSwin, training form vs folded.

What is timed (``repavit detect bench`` / ``repavit segment bench``): the whole model in eval mode on one
image of a fixed size (batch 1), from the ``[0, 1]`` image to the final boxes/masks/label map, as the
paper's Table 6 reports latency. Three forms, built in one process with the same head and timed
interleaved (:func:`repavit.measure.interleaved_throughput`, rotating order):

* ``vanilla``: timm's Swin (``swin_*_patch4_window7_224``, LayerNorm + GELU FFNs) as the backbone;
* ``repa_train``: RePaSwin in its training form (BatchNorm statistics randomized, as after training);
* ``repa_reparam``: the same detector after folding (its outputs checked equal to ``repa_train``'s).

Random weights would make the detectors' post-processing depend on how many boxes pass the score
threshold; the thresholds are set to 0 so every form keeps the same ``detections_per_img`` boxes (and
Mask R-CNN predicts the same number of masks): the worst case, equal for the three. The backbone's
share of the time is measured alone, on the same input, and bounds the reduction the fold can give.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..measure import interleaved_throughput, machine_info, summarize
from .detectors import DetectorConfig, build_detector, detector_backbone
from .segmenter import SegmenterConfig, build_segmenter

__all__ = ["VANILLA_SWIN", "dense_latency"]

_logger = logging.getLogger(__name__)
VANILLA_SWIN = {
    "RePaSwin_Tiny": "swin_tiny_patch4_window7_224",
    "RePaSwin_Small": "swin_small_patch4_window7_224",
    "RePaSwin_Base": "swin_base_patch4_window7_224",
}


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _build(kind: str, model: str, size: int, num_classes: int, detections: int = 100) -> nn.Module:
    if kind == "upernet":
        return build_segmenter(SegmenterConfig(model, num_classes, crop_size=size, stride=size))
    cfg = DetectorConfig(kind, model, num_classes, min_size=size, max_size=size)
    det = build_detector(cfg)
    head = getattr(det, "roi_heads", det)  # Mask R-CNN's box head, or RetinaNet/FCOS themselves
    head.score_thresh, head.detections_per_img = 0.0, detections  # the same number of boxes in every form
    return det


def _backbone_of(kind: str, model: nn.Module) -> nn.Module:
    return model.backbone if kind == "upernet" else detector_backbone(model)


def _forms(kind: str, model: str, size: int, num_classes: int, seed: int, detections: int) -> dict[str, nn.Module]:
    if model not in VANILLA_SWIN:
        raise UserError(f"--model {model}: the latency comparison is for {', '.join(VANILLA_SWIN)}")
    torch.manual_seed(seed)
    vanilla = _build(kind, VANILLA_SWIN[model], size, num_classes, detections).eval()
    torch.manual_seed(seed)
    train = _build(kind, model, size, num_classes, detections)
    _randomize_bn(_backbone_of(kind, train).body, seed)
    train.eval()
    fused = copy.deepcopy(train)
    _backbone_of(kind, fused).reparameterize()
    return {"vanilla": vanilla, "repa_train": train, "repa_reparam": fused}


def _runner(kind: str, model: nn.Module, image: torch.Tensor):
    if kind == "upernet":
        return lambda: model(image[None])
    return lambda: model([image])


def _max_difference(a: torch.Tensor | dict, b: torch.Tensor | dict) -> float:
    """Largest relative difference of the backbone maps (random heads make box rankings near-ties)."""
    if isinstance(a, dict):
        return max(_max_difference(a[k], b[k]) for k in b)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def dense_latency(
    kind: str,
    model: str = "RePaSwin_Tiny",
    *,
    size: int = 640,
    num_classes: int = 80,
    detections: int = 100,
    rounds: int = 5,
    iters: int = 2,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Milliseconds per image for the three forms (module docstring); also the backbone-only times."""
    forms = _forms(kind, model, size, num_classes, seed, detections)
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = ((image - 0.45) / 0.226)[None]
        backbones = {n: _backbone_of(kind, m) for n, m in forms.items()}
        bodies = {n: (lambda b=b: b(x)) for n, b in backbones.items()}
        diff = _max_difference(bodies["repa_reparam"](), bodies["repa_train"]())
        whole = {n: _runner(kind, m, image) for n, m in forms.items()}
        whole_s = interleaved_throughput(whole, 1, rounds, iters, warmup, desc=f"{kind} whole")
        body_s = interleaved_throughput(bodies, 1, rounds, iters, warmup, desc=f"{kind} backbone")
    ms = {n: 1000 / summarize(v)["median"] for n, v in whole_s.items()}
    body_ms = {n: 1000 / summarize(v)["median"] for n, v in body_s.items()}
    return {
        "kind": kind,
        "model": model,
        "vanilla_model": VANILLA_SWIN[model],
        "input": f"1x3x{size}x{size}",
        "num_classes": num_classes,
        "detections_per_image": None if kind == "upernet" else detections,
        "rounds": rounds,
        "iters": iters,
        "ms": ms,
        "backbone_ms": body_ms,
        "backbone_share_vanilla": body_ms["vanilla"] / ms["vanilla"],
        "reparam_vs_vanilla": ms["repa_reparam"] / ms["vanilla"] - 1,
        "reparam_vs_train": ms["repa_reparam"] / ms["repa_train"] - 1,
        "fold_max_rel_difference": diff,
        "samples_img_per_s": {n: summarize(v) for n, v in whole_s.items()},
        "machine": machine_info(),
    }
