"""``build_dataset``: one entry point for every dataset the training flags can name."""

from __future__ import annotations

import os
from collections.abc import Callable

from torch.utils.data import Dataset

from ..errors import ArgumentError, UserError
from .cifar import CIFAR100Local
from .folder import image_folder
from .inat import INatDataset
from .synthetic import SyntheticImages

__all__ = ["DATASETS", "build_dataset", "dataset_classes"]

# --data_set values: the authors' four plus a synthetic set for smoke tests.
DATASETS = ("IMNET", "CIFAR", "INAT", "INAT19", "SYNTH")


def dataset_classes(dataset: Dataset) -> list[str]:
    """Class names of a dataset built here (every one of them exposes ``classes``)."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise UserError(f"{type(dataset).__name__} exposes no 'classes'; cannot tell the number of classes")
    return list(classes)


def _rocksdb(path: str, is_train: bool, transform: Callable | None) -> Dataset:
    try:
        from .rocksdb import RocksDBDataset
    except ModuleNotFoundError as e:
        if e.name in (f"{__package__}.rocksdb",):
            raise UserError(
                "RocksDB support is not installed in this build of repavit (module repavit.data.rocksdb is missing)"
            ) from None
        raise UserError(f"RocksDB support needs a missing module: {e.name}") from None
    except ImportError as e:
        raise UserError(f"RocksDB support could not be loaded: {e}") from None
    db = os.path.join(path, "train.db" if is_train else "val.db")
    if not os.path.exists(db):
        raise FileNotFoundError(f"RocksDB database not found: {db} (expected train.db and val.db in {path})")
    return RocksDBDataset(db, transform=transform)


def _imagenet_layout(data_path: str, is_train: bool, transform: Callable | None) -> Dataset:
    if not data_path:
        raise ArgumentError("{data_path} is required: a folder with train/ and val/, one sub-folder per class in each")
    if not os.path.exists(data_path):
        raise FileNotFoundError(f"data folder not found: {data_path} (expected train/ and val/ inside)")
    if not os.path.isdir(data_path):
        raise ArgumentError("{data_path} is not a folder: {v0}", v0=data_path)
    split = "train" if is_train else "val"
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        if not os.listdir(data_path):
            raise UserError(f"data folder {data_path} is empty: expected train/ and val/, one sub-folder per class")
        raise FileNotFoundError(f"no {split}/ folder in {data_path} (expected {root}/<class>/<image>)")
    return image_folder(root, transform=transform)


def build_dataset(
    is_train: bool,
    data_set: str = "IMNET",
    data_path: str = "",
    transform: Callable | None = None,
    *,
    rocksdb: str | None = None,
    inat_category: str = "name",
    num_classes: int | None = None,
    synthetic_size: int = 512,
    input_size: int = 224,
    seed: int = 0,
) -> tuple[Dataset, int]:
    """Build the training or validation split; return ``(dataset, number of classes)``.

    Args:
        is_train: training split (else validation).
        data_set: ``IMNET`` (ImageFolder ``train/``, ``val/``), ``CIFAR`` (CIFAR-100, local files),
            ``INAT`` / ``INAT19`` (iNaturalist 2018 / 2019 JSON layout) or ``SYNTH`` (generated).
        data_path: dataset folder.
        transform: applied to each PIL image.
        rocksdb: folder holding ``train.db``/``val.db``; replaces ``data_path`` for ``IMNET``.
        inat_category: taxonomy level of iNaturalist labels.
        num_classes: classes of the synthetic set (default 10).
        synthetic_size: number of synthetic images in this split.
        input_size: side of synthetic images.
        seed: seed of the synthetic images.
    """
    if data_set not in DATASETS:
        raise ArgumentError("unknown {data_set} {v0!r}; expected one of {v1}", v0=data_set, v1=", ".join(DATASETS))
    if data_set == "SYNTH":
        ds: Dataset = SyntheticImages(
            synthetic_size,
            num_classes or 10,
            input_size,
            split="train" if is_train else "val",
            seed=seed,
            transform=transform,
        )
    elif rocksdb:
        if data_set != "IMNET":
            raise ArgumentError(
                "{rocksdb} holds ImageNet-layout data; it cannot be combined with {data_set} {v0}", v0=data_set
            )
        ds = _rocksdb(rocksdb, is_train, transform)
    elif data_set == "IMNET":
        ds = _imagenet_layout(data_path, is_train, transform)
    elif data_set == "CIFAR":
        if not data_path:
            raise ArgumentError("{data_path} is required for {data_set} CIFAR (a folder with cifar-100-python/)")
        ds = CIFAR100Local(data_path, train=is_train, transform=transform)
    else:
        if not data_path:
            raise ArgumentError("{data_path} is required for {data_set} {v0} (the iNaturalist folder)", v0=data_set)
        year = 2018 if data_set == "INAT" else 2019
        ds = INatDataset(data_path, train=is_train, year=year, category=inat_category, transform=transform)
    if len(ds) == 0:
        raise UserError(f"the {'training' if is_train else 'validation'} split of {data_set} has no images")
    return ds, len(dataset_classes(ds))
