"""Python API of dense prediction: load a detector or segmenter checkpoint, fold it, evaluate, predict.

A dense checkpoint is ``repavit train``'s layout (:func:`repavit.save_checkpoint`): ``model`` (the whole
detector's state dict), ``record`` (the backbone's model record: name, settings, form) and ``dense``
(the :class:`DetectorConfig` or :class:`SegmenterConfig` that rebuilds the detector); a training
checkpoint adds optimizer, epoch and history. It is read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import UserError
from ..models import read_checkpoint
from ..train.distributed import DistEnv, resolve_device
from ..utils import write_json
from .detectors import DetectorConfig, build_detector, detector_backbone
from .segmenter import SegmenterConfig, build_segmenter
from .tasks import DetectionTask, SegmentationTask

__all__ = ["LoadedDense", "evaluate", "load_dense", "predict_images"]

_logger = logging.getLogger(__name__)


@dataclass
class LoadedDense:
    model: nn.Module
    task: DetectionTask | SegmentationTask
    path: str
    epoch: int | None

    @property
    def backbone(self):
        return detector_backbone(self.model) if isinstance(self.task, DetectionTask) else self.model.backbone

    def reparameterize(self) -> LoadedDense:
        """Fold the backbone's FFNs in place (exact: the outputs change only by rounding)."""
        why = None if hasattr(self.backbone.body, "reparameterize") else "its backbone has no channel-idle FFNs"
        if why:
            raise UserError(f"{self.path} cannot be reparameterized: {why}")
        self.backbone.reparameterize()
        return self


def load_dense(
    path: str | Path, *, task: str | None = None, use_ema: bool = False, data: str | None = None, device: str = "cpu"
) -> LoadedDense:
    """A detector or segmenter checkpoint -> the model (eval mode) and its task (for evaluating on ``data``)."""
    raw = read_checkpoint(path)
    dense = raw.get("dense")
    if not isinstance(dense, dict):
        raise UserError(
            f"{path} is not a detector or segmenter checkpoint (no 'dense' entry): train one with "
            "`repavit detect train` or `repavit segment train`"
        )
    kind = dense.get("task")
    if kind not in ("detection", "segmentation"):
        raise UserError(f"{path}'s 'dense' entry names no task (detection or segmentation): the file was altered")
    if task is not None and kind != task:
        raise UserError(f"{path} holds a {kind} model, not a {task} one")
    if kind == "detection":
        cfg = DetectorConfig.from_dict(dense)
        model, t = build_detector(cfg), DetectionTask(cfg, data)
    else:
        cfg = SegmenterConfig.from_dict(dense)
        model, t = build_segmenter(cfg), SegmentationTask(cfg, data)
    key = "model_ema" if use_ema else "model"
    if key not in raw:
        why = "no EMA weights (train with --model-ema)" if use_ema else "no weights"
        raise UserError(f"{path} holds {why}")
    missing, unexpected = model.load_state_dict(raw[key], strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit its own config: {len(missing)} missing, {len(unexpected)} unexpected "
            f"weights (e.g. {(missing or unexpected)[0]}); the file was altered or written by another tool"
        )
    model.to(resolve_device(device)).eval()
    return LoadedDense(model, t, str(path), raw.get("epoch"))


def evaluate(
    loaded: LoadedDense, *, device: str = "cpu", limit: int | None = None, output: str | Path | None = None
) -> dict[str, Any]:
    """Score the model on its task's validation split; writes ``output`` (eval.json) when given."""
    dev = resolve_device(device)
    env = DistEnv(rank=0, world_size=1, local_rank=0, launcher="none", device=dev)
    metrics = loaded.task.evaluate(loaded.model.to(dev), env, limit=limit)
    report = {
        "checkpoint": loaded.path,
        "epoch": loaded.epoch,
        "reparameterized": loaded.backbone.reparameterized,
        "data": str(loaded.task.data),
        **metrics,
    }
    if output is not None:
        write_json(output, report)
    return report


def predict_images(
    loaded: LoadedDense, images: list[Path], out_dir: Path, *, score_thresh: float = 0.5, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Run on image files; writes a drawn PNG per image and ``predictions.json`` into ``out_dir``."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ..data.robust import load_rgb

    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval()
    names = loaded.task.config.class_names or [str(i) for i in range(loaded.task.config.num_classes)]
    rows, stems = [], set()
    for path in images:
        rgb = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)
        x = rgb.float().div(255).to(dev)
        with torch.no_grad():
            if isinstance(loaded.task, DetectionTask):
                out = model([x])[0]
                keep = out["scores"] >= score_thresh
                boxes, labels, scores = out["boxes"][keep].cpu(), out["labels"][keep].cpu(), out["scores"][keep].cpu()
                texts = [f"{names[int(lab) - 1]} {s:.2f}" for lab, s in zip(labels, scores)]
                drawn = draw_bounding_boxes(rgb, boxes, labels=texts, width=2) if len(boxes) else rgb
                if "masks" in out and keep.any():
                    drawn = draw_segmentation_masks(drawn, out["masks"][keep, 0].cpu() > 0.5, alpha=0.4)
                row = {
                    "image": str(path),
                    "boxes": boxes.tolist(),
                    "scores": scores.tolist(),
                    "labels": [names[int(lab) - 1] for lab in labels],
                }
            else:
                pred = model.predict(x).argmax(0).cpu()
                masks = torch.stack([pred == k for k in range(len(names))])
                drawn = draw_segmentation_masks(rgb, masks, alpha=0.5)
                counts = torch.bincount(pred.flatten(), minlength=len(names))
                row = {"image": str(path), "pixels": {n: int(c) for n, c in zip(names, counts) if c}}
        stem = Path(path).stem
        while stem in stems:  # a/x.jpg and b/x.png: keep both drawings
            stem += "_"
        stems.add(stem)
        target = out_dir / (stem + ".png")
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
        rows.append({**row, "drawn": str(target)})
    write_json(out_dir / "predictions.json", rows)
    _logger.info("wrote %d drawn images and predictions.json to %s", len(rows), out_dir)
    return rows
