"""``repavit bench-data``: images/s of the input pipeline, ImageFolder vs RocksDB, on the same images.

Both datasets hold the same files (the RocksDB database is built from the folder when not given) and
go through the same DataLoader settings: random access (a seeded sampler with replacement, as a
shuffled epoch reads), the training transform by default, and each worker count in turn. The first
batch of each run (worker start-up) is not timed. ``--synthetic N`` makes an ImageNet-like set of N
JPEGs (500x375, about 105 KB each; ImageNet's average is 110 KB) in a temporary folder, so the
benchmark needs no data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from typing import Any

from ..errors import UserError

__all__ = ["make_synthetic_folder", "measure", "register", "run"]

_logger = logging.getLogger(__name__)

MODES = ("train", "eval", "decode", "read")


def make_synthetic_folder(
    root: str | os.PathLike, num_images: int, num_classes: int = 10, size: tuple[int, int] = (500, 375), seed: int = 0
) -> str:
    """Write ``num_images`` JPEGs (quality 90) as ``root/class_XX/img_XXXXX.JPEG``; return ``root``.

    The images are smooth colour fields with noise, which JPEG-compress to sizes close to ImageNet's
    (about 105 KB at 500x375; ImageNet's training JPEGs average 110 KB).
    """
    import numpy as np
    from PIL import Image

    if num_images < num_classes or num_classes < 1:
        raise UserError(
            f"--synthetic needs at least one image per class, got {num_images} images, {num_classes} classes"
        )
    rng = np.random.default_rng(seed)
    w, h = size
    root = os.fspath(root)
    for i in range(num_images):
        folder = os.path.join(root, f"class_{i % num_classes:02d}")
        os.makedirs(folder, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0.0, 24.0, size=(h, w, 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        img.save(os.path.join(folder, f"img_{i:05d}.JPEG"), quality=90)
    return root


class _Size:
    """Transform for ``--mode decode``: the decoded image's size (collatable, no augmentation cost)."""

    def __call__(self, img: Any) -> tuple[int, int]:
        return img.size


class _Raw:
    """``--mode read``: only read the stored bytes (file or database value); yield their length."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, int]:
        ds = self.dataset
        if hasattr(ds, "read_bytes"):
            data = ds.read_bytes(index)
        else:
            with open(ds.samples[index][0], "rb") as f:
                data = f.read()
        return len(data), int(ds.targets[index])


def _transform(mode: str, input_size: int) -> Any:
    from ..data.transforms import TransformConfig, build_transform

    if mode in ("train", "eval"):
        return build_transform(mode == "train", TransformConfig(input_size=input_size))
    return _Size() if mode == "decode" else None


def measure(dataset: Any, workers: int, batch_size: int, batches: int, seed: int = 0) -> dict[str, float]:
    """Time ``batches`` batches after one untimed batch; return images/s and milliseconds per batch.

    With ``workers=0`` the main process loads with one torch thread, as each DataLoader worker does
    (several threads spin against each other on the transform's small per-image tensor ops).
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=(batches + 1) * batch_size, generator=generator)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    try:
        it = iter(loader)
        next(it)  # worker start-up and first decode: not timed
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - t0
        del it
    finally:
        torch.set_num_threads(threads)
    return {"images_per_s": batches * batch_size / seconds, "ms_per_batch": 1e3 * seconds / batches}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-data",
        help="input-pipeline throughput: ImageFolder vs RocksDB with N DataLoader workers",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", metavar="DIR", help="an ImageFolder directory (<class>/<image>)")
    src.add_argument("--synthetic", type=int, metavar="N", help="generate N ImageNet-sized JPEGs in a temp folder")
    p.add_argument("--rocksdb", metavar="DB", help="a database holding the same images (default: built from --folder)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts (default: 0 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per run (default: 10)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every run; the median is reported")
    p.add_argument("--mode", choices=MODES, default="train", help="train/eval transform, decode only, or read only")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--output", metavar="JSON", help="write the results here")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if min(args.workers) < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    for name in ("batch_size", "batches", "rounds", "input_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.synthetic is not None and args.synthetic < 1:
        raise UserError(f"--synthetic must be >= 1, got {args.synthetic}")


def _datasets(folder: str, db: str, mode: str, input_size: int) -> dict[str, Any]:
    from torchvision.datasets import ImageFolder

    from ..data.folder import scan_image_folder
    from ..data.robust import load_rgb
    from ..data.rocksdb import RocksDBDataset

    scan_image_folder(folder)
    tf = _transform(mode, input_size)
    sets: dict[str, Any] = {
        "ImageFolder": ImageFolder(folder, transform=tf, loader=load_rgb),
        "RocksDB": RocksDBDataset(db, transform=tf),
    }
    root = sets["ImageFolder"].root
    names = [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in sets["ImageFolder"].samples]
    if names != list(sets["RocksDB"].keys()):
        raise UserError(f"{folder} and {db} do not hold the same images (different file names or classes)")
    return {k: _Raw(v) for k, v in sets.items()} if mode == "read" else sets


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
    import PIL
    import torch

    from .rocksdb import FolderSource, build_db

    _check(args)
    with tempfile.TemporaryDirectory(prefix="repavit-bench-data-") as tmp:
        folder = args.folder
        if args.synthetic is not None:
            folder = make_synthetic_folder(os.path.join(tmp, "images"), args.synthetic)
        db = args.rocksdb
        if db is None:
            db = os.path.join(tmp, "images.db")
            _logger.info("building a RocksDB copy of %s for the comparison", folder)
            build_db(db, FolderSource(folder), progress=False)
        sets = _datasets(folder, db, args.mode, args.input_size)
        n_images = len(sets["ImageFolder"])
        results: list[dict[str, Any]] = []
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for w in args.workers:
                for name, ds in sets.items():  # interleaved, so drift in machine load hits both alike
                    runs.setdefault((name, w), []).append(measure(ds, w, args.batch_size, args.batches))
        for (name, w), rs in runs.items():
            ips = statistics.median(r["images_per_s"] for r in rs)
            results.append({"dataset": name, "workers": w, "images_per_s": round(ips, 1), "rounds": len(rs)})
    print(f"{'dataset':<12} {'workers':>7} {'images/s':>10}")
    for r in results:
        print(f"{r['dataset']:<12} {r['workers']:>7} {r['images_per_s']:>10.1f}")
    if args.output:
        report = {
            "command": _command(args),
            "mode": args.mode,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "input_size": args.input_size,
            "images_in_set": n_images,
            "synthetic": args.synthetic,
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "pillow": PIL.__version__,
            },
            "results": results,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0
