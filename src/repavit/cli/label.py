"""``repavit label generate``: a teacher's dense score maps for token labeling (LV-ViT)."""

from __future__ import annotations

import argparse

from ._deploy_args import add_source_args, load_from_args, model_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="token labels (LV-ViT): make score maps with a teacher")
    actions = p.add_subparsers(dest="label_command", required=True, metavar="ACTION")
    g = actions.add_parser(
        "generate",
        help="write a teacher's top-k score map of every training image (resumable)",
        description="Run a teacher over the training split (the whole image, resized without cropping) and write "
        "its top-k class scores at every position of its last feature map: OUTPUT/<class>/<image>.pt in LV-ViT's "
        "format, or into a RocksDB when OUTPUT ends in .db. The teacher is a checkpoint of ours (any layout "
        "repavit reads), or any timm model with --model NAME and --weights FILE. Images that already have a "
        "map are skipped, so a stopped run resumes.",
    )
    add_source_args(g, checkpoint_required=False)
    g.add_argument("--weights", default=None, help="weights file of a timm --model (no checkpoint of ours)")
    g.add_argument("--data_path", "--data-path", default="", help="dataset folder with train/ (ImageFolder)")
    g.add_argument("--rocksdb", default=None, help="folder with train.db, instead of --data_path")
    g.add_argument("--data_set", "--data-set", default="IMNET", choices=("IMNET", "SYNTH"))
    g.add_argument("--synthetic_train_size", type=int, default=512, help="images of --data_set SYNTH")
    g.add_argument("--seed", type=int, default=0, help="seed of --data_set SYNTH")
    g.add_argument("-o", "--output", required=True, help="label folder, or a RocksDB path ending in .db")
    g.add_argument("--topk", type=int, default=5, help="classes kept per position (LV-ViT: 5)")
    g.add_argument("--teacher-size", type=int, default=None, help="teacher input side (default: its own)")
    g.add_argument("--batch-size", "--batch_size", type=int, default=32)
    g.add_argument("--num-workers", "--num_workers", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    g.add_argument("--overwrite", action="store_true", help="rewrite maps that exist")
    g.set_defaults(func=run)


def _teacher(args: argparse.Namespace):
    """``(model, name)`` from a checkpoint of ours, or a timm model with a weights file."""
    import os

    import timm

    from ..errors import ArgumentError

    if args.checkpoint or (args.model and not args.weights):
        if not args.checkpoint:
            raise ArgumentError("a teacher needs weights: give CHECKPOINT, or {model} NAME with --weights FILE")
        loaded = load_from_args(args)
        return loaded.model, loaded.model_name
    if not args.model:
        raise ArgumentError("a teacher needs weights: give CHECKPOINT, or {model} NAME with --weights FILE")
    if not os.path.isfile(args.weights):
        raise ArgumentError("--weights {v0}: no such file", v0=args.weights)
    overlay = dict(file=args.weights)
    model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs(args))
    return model, args.model


def run(args: argparse.Namespace) -> int:
    from ..data import build_dataset, dataset_classes
    from ..errors import UserError
    from ..train.token_labeling import generate_token_labels, label_summary, teacher_transform

    teacher, name = _teacher(args)
    data, _ = build_dataset(
        True,
        args.data_set,
        args.data_path,
        transform=teacher_transform(teacher, args.teacher_size),
        rocksdb=args.rocksdb,
        num_classes=getattr(teacher, "num_classes", None) if args.data_set == "SYNTH" else None,
        synthetic_size=args.synthetic_train_size,
        input_size=args.teacher_size or 224,
        seed=args.seed,
    )
    classes = len(dataset_classes(data))
    if getattr(teacher, "num_classes", classes) != classes:
        raise UserError(
            f"the teacher {name} has {teacher.num_classes} classes, the training split {classes}: its class ids "
            "would not be the dataset's (use a teacher trained on these classes)"
        )
    print(f"teacher {name} on {len(data)} training images, top-{args.topk} -> {args.output}")
    stats = generate_token_labels(
        teacher,
        data,
        args.output,
        topk=args.topk,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        overwrite=args.overwrite,
    )
    print(label_summary(args.output, stats))
    return 0
