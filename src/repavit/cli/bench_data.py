"""``repavit bench-data``: the command line of :func:`repavit.bench.data_pipeline.compare_pipelines`."""

from __future__ import annotations

import argparse

from ..utils import write_json

DESCRIPTION = """\
Images/s of the input pipeline, ImageFolder vs RocksDB, on the same images. Both datasets hold the
same files (the RocksDB database is built from the folder when not given) and go through the same
DataLoader settings: random access (a seeded sampler with replacement, as a shuffled epoch reads),
the training transform by default, and each worker count in turn. The first batch of each run
(worker start-up) is not timed. --synthetic N makes an ImageNet-like set of N JPEGs (500x375,
about 105 KB each; ImageNet's average is 110 KB) in a temporary folder, so no data is needed.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from ..bench.data_pipeline import MODES

    p = sub.add_parser(
        "bench-data",
        help="input-pipeline throughput: ImageFolder vs RocksDB with N DataLoader workers",
        description=DESCRIPTION,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", metavar="DIR", help="an ImageFolder directory (<class>/<image>)")
    src.add_argument("--synthetic", type=int, metavar="N", help="generate N ImageNet-sized JPEGs in a temp folder")
    p.add_argument("--rocksdb", metavar="DB", help="a database holding the same images (default: built from --folder)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts (default: 0 2)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per run (default: 10)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every run; the median is reported")
    p.add_argument("--mode", choices=MODES, default="train", help="train/eval transform, decode only, or read only")
    p.add_argument("--input-size", "--input_size", type=int, default=224)
    p.add_argument("--output", metavar="JSON", help="write the results here")
    p.set_defaults(func=run)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    parts = ["repavit", "bench-data"]
    parts += ["--folder", args.folder] if args.folder else ["--synthetic", str(args.synthetic)]
    if args.rocksdb:
        parts += ["--rocksdb", args.rocksdb]
    parts += ["--workers", *map(str, args.workers), "--batch-size", str(args.batch_size)]
    parts += ["--batches", str(args.batches), "--rounds", str(args.rounds), "--mode", args.mode]
    parts += ["--input-size", str(args.input_size)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    from ..bench.data_pipeline import compare_pipelines

    report = compare_pipelines(
        folder=args.folder,
        synthetic=args.synthetic,
        rocksdb=args.rocksdb,
        workers=args.workers,
        batch_size=args.batch_size,
        batches=args.batches,
        rounds=args.rounds,
        mode=args.mode,
        input_size=args.input_size,
    )
    print(f"{'dataset':<12} {'workers':>7} {'images/s':>10}")
    for r in report["results"]:
        print(f"{r['dataset']:<12} {r['workers']:>7} {r['images_per_s']:>10.1f}")
    if args.output:
        write_json(args.output, {"command": _command(args), **report})
    return 0
