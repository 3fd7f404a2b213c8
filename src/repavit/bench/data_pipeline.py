"""Images/s of the input pipeline, ImageFolder vs RocksDB, on the same images (``repavit bench-data``).

Both datasets hold the same files (the RocksDB database is built from the folder when not given) and
go through the same DataLoader settings: random access (a seeded sampler with replacement, as a
shuffled epoch reads), the training transform by default, and each worker count in turn. The first
batch of each run (worker start-up) is not timed. ``synthetic=N`` makes an ImageNet-like set of N
JPEGs (500x375, about 105 KB each; ImageNet's average is 110 KB) in a temporary folder, so the
benchmark needs no data.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from ..errors import ArgumentError, UserError

__all__ = ["MODES", "compare_pipelines", "make_synthetic_folder", "measure"]

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
        raise ArgumentError(
            "{synthetic} needs at least one image per class, got {n} images, {k} classes", n=num_images, k=num_classes
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
    """Transform for ``mode="decode"``: the decoded image's size (collatable, no augmentation cost)."""

    def __call__(self, img: Any) -> tuple[int, int]:
        return img.size


class _Raw:
    """``mode="read"``: only read the stored bytes (file or database value); yield their length."""

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


def _check(workers: Sequence[int], synthetic: int | None, **positive: int) -> None:
    if not workers or min(workers) < 0:
        raise ArgumentError("{workers} must be >= 0, got {value}", value=list(workers))
    for name, value in positive.items():
        if value < 1:
            raise ArgumentError("{" + name + "} must be >= 1, got {value}", value=value)
    if synthetic is not None and synthetic < 1:
        raise ArgumentError("{synthetic} must be >= 1, got {value}", value=synthetic)


def compare_pipelines(
    folder: str | None = None,
    synthetic: int | None = None,
    rocksdb: str | None = None,
    workers: Sequence[int] = (0, 2),
    batch_size: int = 64,
    batches: int = 10,
    rounds: int = 1,
    mode: str = "train",
    input_size: int = 224,
) -> dict[str, Any]:
    """Images/s of ImageFolder and RocksDB on the same images, for each worker count, interleaved.

    Args:
        folder: an ImageFolder directory; or ``synthetic``: that many generated JPEGs (one of the two).
        rocksdb: a database holding the same images (default: built from the folder in a temporary folder).
        workers: DataLoader worker counts, each timed in turn.
        batch_size, batches: batch size, and timed batches per run.
        rounds: repeat every run; the median is reported.
        mode: ``train``/``eval`` transform, ``decode`` only, or ``read`` only (see :data:`MODES`).
        input_size: the transform's output size.

    Returns:
        The settings, ``images_in_set``, ``host`` and ``results`` (dataset, workers, images/s, rounds).
    """
    import PIL
    import torch

    from ..data.rocksdb_build import FolderSource, build_db

    if (folder is None) == (synthetic is None):
        raise ArgumentError("give one of {folder} and {synthetic}")
    if mode not in MODES:
        raise ArgumentError("unknown {mode} {value!r}; expected one of {modes}", value=mode, modes=", ".join(MODES))
    _check(workers, synthetic, batch_size=batch_size, batches=batches, rounds=rounds, input_size=input_size)
    with tempfile.TemporaryDirectory(prefix="repavit-bench-data-") as tmp:
        if synthetic is not None:
            folder = make_synthetic_folder(os.path.join(tmp, "images"), synthetic)
        db = rocksdb
        if db is None:
            db = os.path.join(tmp, "images.db")
            _logger.info("building a RocksDB copy of %s for the comparison", folder)
            build_db(db, FolderSource(folder), progress=False)
        sets = _datasets(folder, db, mode, input_size)
        n_images = len(sets["ImageFolder"])
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(rounds):
            for w in workers:
                for name, ds in sets.items():  # interleaved, so drift in machine load hits both alike
                    runs.setdefault((name, w), []).append(measure(ds, w, batch_size, batches))
    results = [
        {"dataset": name, "workers": w, "images_per_s": round(statistics.median(r["images_per_s"] for r in rs), 1)}
        | {"rounds": len(rs)}
        for (name, w), rs in runs.items()
    ]
    host = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
    }
    settings = {"mode": mode, "batch_size": batch_size, "batches": batches, "input_size": input_size}
    return {**settings, "images_in_set": n_images, "synthetic": synthetic, "host": host, "results": results}
