"""``repavit detect data | train | eval | predict | bench``: RetinaNet, Mask R-CNN and FCOS with RePa backbones."""

from __future__ import annotations

import argparse

from ._dense_args import add_data_parser, add_train_args, fit_and_report, key_values, schedule_of
from ._dense_bench import add_bench_parser
from ._dense_eval import add_eval_parser, add_predict_parser


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="object detection with RePa backbones (torchvision RetinaNet/Mask R-CNN/FCOS)")
    inner = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_data_parser(inner, "coco", "write the shipped detection set (real digits on real photos) in COCO layout")
    t = inner.add_parser(
        "train",
        help="train a detector on a COCO-layout folder",
        description="DIR/annotations/instances_{train,val}.json with images in DIR/train and DIR/val. Defaults are "
        "MMDetection's 1x AdamW schedule (12 epochs, lr 1e-4, steps at 8 and 11). Prints and logs box AP after "
        "each evaluation; checkpoint.pth carries the detector config and the backbone's model record.",
    )
    t.add_argument("--detector", choices=("retinanet", "maskrcnn", "fcos"), default="retinanet")
    t.add_argument("--min-size", type=int, default=800, help="shorter image side after resizing")
    t.add_argument("--max-size", type=int, default=1333, help="longest image side after resizing")
    t.add_argument("--fpn-channels", type=int, default=256)
    t.add_argument("--rois-per-image", type=int, default=512, help="Mask R-CNN: RoIs sampled per image in training")
    add_train_args(t, epochs=12, lr=1e-4, batch_size=2, warmup=500)
    t.set_defaults(func=run_train)
    add_eval_parser(inner, "detection")
    add_predict_parser(inner, "detection")
    add_bench_parser(inner, ("retinanet", "maskrcnn"), 640)


def run_train(args: argparse.Namespace) -> int:
    from ..data.dense import CocoDetection
    from ..dense.detectors import DetectorConfig
    from ..dense.tasks import DetectionTask

    schedule = schedule_of(args, lr_steps=(8, 11))
    val = CocoDetection(args.data, "val")  # checks the layout before anything starts
    names = val.category_names[1:]
    cfg = DetectorConfig(
        args.detector,
        args.model,
        len(names),
        class_names=names,
        min_size=args.min_size,
        max_size=args.max_size,
        fpn_channels=args.fpn_channels,
        rois_per_image=args.rois_per_image,
        bn=args.bn,
        model_kwargs=key_values(args.model_kwargs),
    )
    return fit_and_report(DetectionTask(cfg, args.data), args, schedule)
