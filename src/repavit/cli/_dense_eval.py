"""``repavit detect|segment eval`` and ``predict``: score and run a dense checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserError


def add_eval_parser(sub, task: str) -> None:
    p = sub.add_parser("eval", help=f"score a {task} checkpoint on the validation split (printed and eval.json)")
    p.add_argument("checkpoint")
    p.add_argument("--data", "--data-path", dest="data", required=True, help="dataset folder")
    p.add_argument("--reparam", action="store_true", help="fold the backbone first (same scores, less time)")
    p.add_argument("--use-ema", action="store_true", help="score the EMA weights")
    p.add_argument("--limit", type=int, default=None, help="only the first N validation images")
    p.add_argument("--output", default=None, help="eval.json path (default: beside the checkpoint)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=lambda a: _run_eval(a, task))


def _run_eval(args: argparse.Namespace, task: str) -> int:
    from ..dense.api import evaluate, load_dense

    loaded = load_dense(args.checkpoint, task=task, use_ema=args.use_ema, data=args.data, device=args.device)
    if args.reparam:
        loaded.reparameterize()
    out = args.output or str(Path(args.checkpoint).with_name("eval_reparam.json" if args.reparam else "eval.json"))
    report = evaluate(loaded, device=args.device, limit=args.limit, output=out)
    print(describe_scores(report))
    print(f"wrote {out}")
    return 0


def describe_scores(report: dict[str, Any]) -> str:
    form = "reparameterized" if report.get("reparameterized") else "training form"
    head = f"{report.get('images')} images, {form}, {report.get('ms_per_image', 0):.1f} ms/image"
    if "bbox" in report:
        lines = [head]
        for iou in ("bbox", "segm"):
            if iou in report:
                s = report[iou]
                vals = "  ".join(
                    f"{k} {100 * s[k]:.1f}" if s.get(k) is not None else f"{k} -"
                    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")
                )
                lines.append(f"{iou}: {vals}")
        return "\n".join(lines)
    return f"{head}\nmIoU {100 * report['mIoU']:.2f}  mAcc {100 * report['mAcc']:.2f}  aAcc {100 * report['aAcc']:.2f}"


def add_predict_parser(sub, task: str) -> None:
    p = sub.add_parser("predict", help=f"run a {task} checkpoint on images; writes drawn PNGs and predictions.json")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--reparam", action="store_true", help="fold the backbone first")
    p.add_argument("--score-thresh", type=float, default=0.5, help="detections below this score are not drawn")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=lambda a: _run_predict(a, task))


def _run_predict(args: argparse.Namespace, task: str) -> int:
    from ..dense.api import load_dense, predict_images
    from ..export.int8 import IMAGE_SUFFIXES

    files: list[Path] = []
    for item in map(Path, args.images):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item} is not an image file or folder")
    if not files:
        raise UserError(f"no images in {' '.join(args.images)} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    loaded = load_dense(args.checkpoint, task=task, device=args.device)
    if args.reparam:
        loaded.reparameterize()
    rows = predict_images(loaded, files, Path(args.output), score_thresh=args.score_thresh, device=args.device)
    print(f"{len(rows)} images -> {args.output} (drawn PNGs, predictions.json)")
    return 0
