"""Detection and segmentation as tasks of the dense training loop: build, batch, loss, evaluate, record.

Unreadable training images are replaced by the next readable one (:class:`~repavit.data.robust.RobustDataset`,
one warning per file); an unreadable evaluation image is an error naming it, since skipping it would
change the score silently.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..data.dense import AdeSegmentation, CocoDetection, collate_detection
from ..data.robust import RobustDataset
from ..errors import UserError
from ..models.record import CheckpointMismatchError, ModelRecord, record_of
from ..train.distributed import DistEnv, all_reduce_sum, gather_objects
from .detectors import DetectorConfig, build_detector
from .metrics import coco_evaluate, confusion_matrix, segmentation_scores, to_coco_results
from .segmenter import SegmenterConfig, build_segmenter

__all__ = ["DetectionTask", "SegmentationTask"]


def _loader(ds, env: DistEnv, collate=None, schedule=None) -> DataLoader:
    """Training (``schedule`` given): shuffled, batches of ``--batch-size`` (a DistributedSampler shard per
    process). Evaluation: one image at a time, image ``rank``, ``rank + world``, ... in order, without the
    padding a DistributedSampler adds (a repeated image would count twice)."""
    train = schedule is not None
    if not env.distributed:
        sampler = None
    elif train:
        sampler = DistributedSampler(ds, env.world_size, env.rank, shuffle=True, seed=schedule.seed)
    else:
        sampler = list(range(env.rank, len(ds), env.world_size))
    if train and len(sampler if sampler is not None else ds) < schedule.batch_size:
        raise UserError(
            f"{len(ds)} training images give each of {env.world_size} process(es) fewer than --batch-size "
            f"{schedule.batch_size}: lower --batch-size or add images"
        )
    return DataLoader(
        ds,
        batch_size=schedule.batch_size if train else 1,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=schedule.workers if train else 0,
        collate_fn=collate,
        drop_last=train,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(schedule.seed) if train else None,
    )


def _check(saved: dict[str, Any], current: dict[str, Any], path: str, keys: tuple[str, ...]) -> None:
    for k in keys:
        if saved.get(k) != current.get(k):
            raise CheckpointMismatchError(
                f"{path} was trained with {k}={saved.get(k)!r}, this run has {k}={current.get(k)!r}: "
                "resume with the same settings or start another --output-dir"
            )


class _Task:
    config: Any
    unused_parameters = False

    def record(self, model: nn.Module) -> ModelRecord:
        body = model.backbone.body.body
        return record_of(body, self.config.model)

    @staticmethod
    def batch_len(batch) -> int:
        return len(batch[0])


class DetectionTask(_Task):
    """COCO-layout detection (``DIR/annotations/instances_{train,val}.json``, images in ``DIR/{train,val}/``)."""

    def __init__(self, cfg: DetectorConfig, data: str | Path | None) -> None:
        self.config, self.data = cfg, Path(data) if data is not None else None
        self.masks = cfg.detector == "maskrcnn"

    def build(self, pretrained: str | None = None) -> nn.Module:
        return build_detector(self.config, pretrained)

    def check_config(self, saved: dict[str, Any], path: str) -> None:
        _check(
            saved,
            self.config.to_dict(),
            path,
            ("task", "detector", "model", "num_classes", "fpn_channels", "model_kwargs", "min_size", "max_size"),
        )

    def check_data(self, ds: CocoDetection) -> None:
        """The dataset's categories are the detector's (count and names), or a one-line error."""
        names = ds.category_names[1:]
        want = self.config.class_names
        if ds.num_classes != self.config.num_classes or (want is not None and names != want):
            raise UserError(
                f"{ds.annotation_file} has {ds.num_classes} categories ({', '.join(names[:5])}"
                f"{', ...' if len(names) > 5 else ''}), the detector {self.config.num_classes}"
                f"{' (' + ', '.join(want[:5]) + ')' if want else ''}: use data with the detector's categories"
            )

    def train_loader(self, s, env: DistEnv) -> DataLoader:
        base = CocoDetection(self.data, "train", masks=self.masks, train=True)
        self.check_data(base)
        return _loader(RobustDataset(base), env, collate_detection, schedule=s)

    @staticmethod
    def loss(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        parts = model(images, targets)
        return sum(parts.values()), {k: v.detach().item() for k, v in parts.items()}

    def evaluate(self, model: nn.Module, env: DistEnv, split: str = "val", limit: int | None = None) -> dict:
        ds = CocoDetection(self.data, split, masks=False)
        self.check_data(ds)
        if limit is not None and limit < 1:
            raise UserError(f"--limit {limit}: expected at least 1 image")
        if limit:
            ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
        results, seconds, n = [], 0.0, 0
        model.eval()
        with torch.no_grad():
            for images, targets in _loader(ds, env, collate_detection):
                t0 = time.perf_counter()
                outputs = model([im.to(env.device) for im in images])
                seconds += time.perf_counter() - t0
                n += len(images)
                for out, t in zip(outputs, targets):
                    results += to_coco_results(int(t["image_id"]), out, base.label_to_category, self.masks)
        everything = gather_objects(results, env)
        seconds, n = all_reduce_sum([seconds, float(n)], env)
        if not env.is_main:
            return {}
        merged = [r for part in everything for r in part]
        iou = ("bbox", "segm") if self.masks else ("bbox",)
        ids = None if limit is None else [int(base.images[i]["id"]) for i in range(len(ds))]
        scores = coco_evaluate(base.annotation_file, merged, iou, image_ids=ids)
        return {**scores, "images": int(n), "detections": len(merged), "ms_per_image": 1000 * seconds / max(n, 1)}

    @staticmethod
    def flat(metrics: dict) -> dict[str, Any]:
        out = {f"{iou}_{k}": v for iou in ("bbox", "segm") for k, v in metrics.get(iou, {}).items() if k != "summary"}
        return {**out, **{k: metrics[k] for k in ("ms_per_image",) if k in metrics}}

    @staticmethod
    def describe(row: dict) -> str:
        parts = [f"loss {sum(v for k, v in row.items() if k.startswith('train_') and k != 'train_time_s'):.3f}"]
        for k in ("bbox_AP", "bbox_AP50", "segm_AP"):
            if row.get(k) is not None:
                parts.append(f"{k.replace('_', ' ')} {100 * row[k]:.1f}")
        return ", ".join(parts)


class SegmentationTask(_Task):
    """ADE20K-layout segmentation (``DIR/images/{training,validation}``, ``DIR/annotations/...``)."""

    def __init__(self, cfg: SegmenterConfig, data: str | Path | None) -> None:
        self.config, self.data = cfg, Path(data) if data is not None else None

    def build(self, pretrained: str | None = None) -> nn.Module:
        return build_segmenter(self.config, pretrained)

    def record(self, model: nn.Module) -> ModelRecord:
        return record_of(model.backbone.body, self.config.model)

    def check_config(self, saved: dict[str, Any], path: str) -> None:
        keys = ("task", "model", "num_classes", "channels", "model_kwargs", "bn", "crop_size", "inference", "stride")
        _check(saved, self.config.to_dict(), path, keys)

    def train_loader(self, s, env: DistEnv) -> DataLoader:
        ds = AdeSegmentation(
            self.data, "training", train=True, crop_size=self.config.crop_size, num_classes=self.config.num_classes
        )
        return _loader(RobustDataset(ds), env, schedule=s)

    @staticmethod
    def loss(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch
        logits, labels = model(images.to(device)), labels.to(device)
        if not (labels != 255).any():  # a crop of ignored pixels only: nothing to learn (not a NaN)
            loss = logits.sum() * 0.0
            return loss, {"loss": 0.0}
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        return loss, {"loss": loss.detach().item()}

    def evaluate(self, model: nn.Module, env: DistEnv, split: str = "validation", limit: int | None = None) -> dict:
        ds = AdeSegmentation(self.data, split, num_classes=self.config.num_classes)
        if limit is not None and limit < 1:
            raise UserError(f"--limit {limit}: expected at least 1 image")
        if limit:
            ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        K = self.config.num_classes
        conf = torch.zeros(K, K, dtype=torch.int64)
        seconds, n = 0.0, 0
        model.eval()
        with torch.no_grad():
            for image, label in _loader(ds, env):
                t0 = time.perf_counter()
                pred = model.predict(image[0].to(env.device)).argmax(0).cpu()
                seconds += time.perf_counter() - t0
                n += 1
                conf += confusion_matrix(pred, label[0], K)
        if env.distributed:  # on the device: NCCL reduces device tensors only
            summed = conf.to(env.device)
            torch.distributed.all_reduce(summed)
            conf = summed.cpu()
        seconds, n = all_reduce_sum([seconds, float(n)], env)
        scores = segmentation_scores(conf, self.config.class_names)
        timing = {"images": int(n), "ms_per_image": 1000 * seconds / max(n, 1)}
        return {**scores, **timing, "inference": self.config.inference}

    @staticmethod
    def flat(metrics: dict) -> dict[str, Any]:
        return {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "ms_per_image") if k in metrics}

    @staticmethod
    def describe(row: dict) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("train_loss", "mIoU", "aAcc"))
