"""``repavit rocksdb build | info``: the command line of :mod:`repavit.data.rocksdb_build`."""

from __future__ import annotations

import argparse
import os

from ..utils import write_json

BUILD_DESCRIPTION = """\
Read the ImageNet tar files (ILSVRC2012_img_train.tar: a tar of per-class <wnid>.tar;
ILSVRC2012_img_val.tar plus --val-labels, one wnid per line for the sorted file names) or any
ImageFolder directory, and write OUTPUT/train.db and OUTPUT/val.db in the authors' format.

Restarting an interrupted build resumes it: keys already in the database are skipped (a
<db>.build.json file records the source and whether the build finished). A database that holds
images but is not an unfinished build of the same source is refused unless --resume (add only the
missing images) or --overwrite (delete and rebuild). At the end every source image is checked to be
in the database with its exact size, and the key list is cached for the --rocksdb loader.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from ..data.rocksdb_build import SOURCE_KINDS

    p = sub.add_parser(
        "rocksdb",
        help="build and inspect RocksDB image databases (the --rocksdb format)",
        description="Build train.db / val.db from ImageNet tars or ImageFolder directories, or inspect one.",
    )
    actions = p.add_subparsers(dest="rocksdb_command", required=True, metavar="ACTION")
    b = actions.add_parser(
        "build",
        help="write OUTPUT/train.db and/or OUTPUT/val.db",
        description=BUILD_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--source",
        required=True,
        choices=SOURCE_KINDS,
        help="imagenet-tar: --train ILSVRC2012_img_train.tar, --val ILSVRC2012_img_val.tar with --val-labels; "
        "folder: --train / --val are ImageFolder directories (<class>/<image>)",
    )
    b.add_argument("--train", metavar="PATH", help="training source (tar or folder)")
    b.add_argument("--val", metavar="PATH", help="validation source (tar or folder)")
    b.add_argument(
        "--val-labels", "--val_labels", metavar="FILE", help="imagenet-tar: one wnid per line, for the sorted val files"
    )
    b.add_argument("--output", required=True, metavar="DIR", help="folder that receives train.db / val.db")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="add only the images missing from an existing database")
    mode.add_argument("--overwrite", action="store_true", help="delete an existing database and rebuild it")
    b.add_argument("--batch-size", "--batch_size", type=int, default=256, help="images per write batch (default: 256)")
    b.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    i = actions.add_parser(
        "info",
        help="images and classes of a database",
        description="Images per class, and whether the build finished. Exit code 1 for an unfinished build or "
        "(with --check) unreadable images.",
    )
    i.add_argument("db", metavar="DB", help="a database folder, e.g. OUT/train.db")
    i.add_argument("--per-class", "--per_class", action="store_true", help="print the count of every class")
    i.add_argument("--check", action="store_true", help="decode every image and list the unreadable ones")
    i.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    i.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    from ..data.rocksdb_build import build_db, open_sources

    sources = open_sources(args.source, args.train, args.val, args.val_labels)  # every input checked first
    os.makedirs(args.output, exist_ok=True)
    for split, source in sources:
        s = build_db(
            os.path.join(args.output, f"{split}.db"),
            source,
            resume=args.resume,
            overwrite=args.overwrite,
            batch_size=args.batch_size,
            progress=False if args.no_progress else None,
        )
        print(
            f"{split}.db: {s['images']} images in {s['classes']} classes, verified "
            f"({s['written']} written, {s['skipped']} already present; {s['written_bytes'] / 1e6:.1f} MB "
            f"in {s['seconds']:.1f} s)"
        )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..data.rocksdb_build import inspect_db

    r = inspect_db(args.db, check=args.check, on_bad=lambda message: print(f"  unreadable: {message}"))
    print(
        f"{r['db']}: {r['images']} images, {r['classes']} classes (per class min {r['per_class_min']}, "
        f"median {r['per_class_median']:g}, max {r['per_class_max']}); {r['disk_bytes'] / 1e9:.3f} GB on disk"
    )
    if args.per_class:
        for c, n in r["per_class"].items():
            print(f"  {c}\t{n}")
    if r["status"] == "in-progress":
        print(
            f"{r['db']}: UNFINISHED: the build was interrupted and some images are missing; finish it with "
            "`repavit rocksdb build ... --resume` (same source and output)"
        )
    elif r["status"] == "unknown":
        print(f"{r['db']}: no build record (not written by repavit): whether it is complete cannot be told")
    if args.check:
        print(f"{len(r['unreadable'])} unreadable images")
    if args.json:
        write_json(args.json, r if args.per_class else {k: v for k, v in r.items() if k != "per_class"})
    return 1 if r["status"] == "in-progress" or r.get("unreadable") else 0
