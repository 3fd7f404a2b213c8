"""Dense-prediction metrics: COCO box and mask AP (pycocotools) and segmentation mIoU.

* Detection: predictions become COCO result entries (``bbox`` as ``[x, y, w, h]``, masks as RLE of the
  mask thresholded at 0.5, the category id the dataset mapped to the label) and ``COCOeval`` scores them
  against the annotation file: AP (IoU 0.50:0.95), AP50, AP75, APs, APm, APl, for ``bbox`` and ``segm``.
  No detection at all scores 0 (``COCO.loadRes`` refuses an empty list).
* Segmentation: a confusion matrix over the scored pixels (label 255 is ignored) gives mIoU (mean over
  the classes present in the labels or the predictions, MMSegmentation's rule: a class absent from both
  is NaN and left out), mAcc (mean per-class recall over classes present in the labels) and aAcc (pixel
  accuracy).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

__all__ = ["COCO_NAMES", "coco_evaluate", "confusion_matrix", "segmentation_scores", "to_coco_results"]

COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IGNORE = 255


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise UserError("COCO evaluation needs pycocotools: pip install 'repavit[dense]'") from None
    return COCO, COCOeval, mask_utils


def to_coco_results(
    image_id: int, output: dict[str, Tensor], label_to_category: Sequence[int], masks: bool
) -> list[dict[str, Any]]:
    """One image's detector output -> COCO result entries (``label_to_category[label]`` is the category id)."""
    _, _, mask_utils = _pycocotools()
    boxes = output["boxes"].detach().cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores, labels = output["scores"].tolist(), output["labels"].tolist()
    rles = []
    if masks and "masks" in output:
        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
        for r in rles:
            r["counts"] = r["counts"].decode("ascii")
    out = []
    for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        entry = {"image_id": int(image_id), "category_id": int(label_to_category[label]), "bbox": box, "score": score}
        if rles:
            entry["segmentation"] = rles[k]
        out.append(entry)
    return out


def coco_evaluate(
    annotation_file: str | Path,
    results: list[dict[str, Any]],
    iou_types: Sequence[str],
    image_ids: Sequence[int] | None = None,
) -> dict:
    """COCOeval's summary per IoU type: ``{"bbox": {"AP": ..., "AP50": ...}, "segm": {...}}`` (in [0, 1]).

    ``image_ids``: score only these images (an evaluation of the first N); None: every image of the file.
    """
    COCO, COCOeval, _ = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
    scores = {}
    for iou in iou_types:
        entries = [r for r in results if iou == "bbox" or "segmentation" in r]
        if not entries:
            scores[iou] = dict.fromkeys(COCO_NAMES, 0.0)
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            dt = gt.loadRes(entries)
            ev = COCOeval(gt, dt, iou)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # COCOeval gives -1 where no ground truth exists (e.g. no small objects): report None, not a score
        scores[iou] = {n: (float(v) if v >= 0 else None) for n, v in zip(COCO_NAMES, ev.stats[:6])}
        scores[iou]["summary"] = buf.getvalue().strip().splitlines()[-12:]
    return scores


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` counts, rows = label, columns = prediction, over pixels whose label is not 255."""
    keep = label != IGNORE
    if keep.any() and int(label[keep].max()) >= num_classes:
        raise UserError(f"a label map holds class {int(label[keep].max())}: expected 0 to {num_classes - 1} or 255")
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (in [0, 1]) and per-class IoU from a confusion matrix."""
    conf = conf.double()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    names = list(class_names) if class_names else [str(i) for i in range(len(tp))]
    total = float(gt.sum())
    return {
        "mIoU": float(np.nanmean(iou.numpy())) if (union > 0).any() else 0.0,
        "mAcc": float(np.nanmean(acc.numpy())) if (gt > 0).any() else 0.0,
        "aAcc": float(tp.sum() / total) if total else 0.0,
        "per_class_IoU": {n: (None if v != v else float(v)) for n, v in zip(names, iou.tolist())},
        "pixels": int(total),
    }
