"""``repavit segment data | train | eval | predict | bench``: UperNet semantic segmentation with RePa backbones."""

from __future__ import annotations

import argparse

from ._dense_args import add_data_parser, add_train_args, fit_and_report, key_values, schedule_of
from ._dense_bench import add_bench_parser
from ._dense_eval import add_eval_parser, add_predict_parser


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="semantic segmentation with RePa backbones (UperNet)")
    inner = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_data_parser(inner, "ade20k", "write the shipped segmentation set (real digits on real photos), ADE20K layout")
    t = inner.add_parser(
        "train",
        help="train an UperNet on an ADE20K-layout folder",
        description="DIR/images/{training,validation}/*.jpg with DIR/annotations/{training,validation}/*.png; label 0 "
        "is ignored and 1..K are the classes (ADE20K's convention, MMSegmentation's reduce_zero_label). Training "
        "takes random rescaled crops; evaluation prints mIoU, mAcc and pixel accuracy.",
    )
    t.add_argument("--num-classes", type=int, default=None, help="classes (default: from DIR/classes.json)")
    t.add_argument("--crop-size", type=int, default=512, help="training crop (and sliding window) side")
    t.add_argument(
        "--inference", choices=("whole", "slide"), default="whole", help="evaluation: whole image or windows"
    )
    t.add_argument("--stride", type=int, default=341, help="sliding-window stride")
    t.add_argument("--channels", type=int, default=512, help="UperNet head channels")
    add_train_args(t, epochs=16, lr=6e-5, batch_size=2, warmup=1500)
    t.set_defaults(func=run_train)
    add_eval_parser(inner, "segmentation")
    add_predict_parser(inner, "segmentation")
    add_bench_parser(inner, ("upernet",), 512)


def run_train(args: argparse.Namespace) -> int:
    from ..data.dense import AdeSegmentation
    from ..dense.segmenter import SegmenterConfig
    from ..dense.tasks import SegmentationTask

    schedule = schedule_of(args, lr_steps=())
    val = AdeSegmentation(args.data, "validation", num_classes=args.num_classes)  # checks the layout first
    names = list(val.classes)
    cfg = SegmenterConfig(
        args.model,
        val.num_classes,
        class_names=names,
        channels=args.channels,
        bn=args.bn,
        crop_size=args.crop_size,
        inference=args.inference,
        stride=min(args.stride, args.crop_size),
        model_kwargs=key_values(args.model_kwargs),
    )
    return fit_and_report(SegmentationTask(cfg, args.data), args, schedule)
