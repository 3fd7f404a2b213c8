"""Datasets, transforms and samplers for training and evaluation.

Datasets: ImageFolder (``train/``, ``val/``), CIFAR-100 from local files, iNaturalist 2018/2019
(JSON layout), RocksDB (``repavit.data.rocksdb``, optional) and a synthetic set for smoke tests.
"""

from .cifar import CIFAR100Local
from .datasets import DATASETS, build_dataset, dataset_classes
from .folder import image_folder, scan_image_folder
from .inat import INAT_CATEGORIES, INatDataset
from .samplers import EpochPositions, RASampler, ShardedEvalSampler
from .seeded import SeededSamples
from .synthetic import SyntheticImages
from .transforms import TransformConfig, build_transform, three_augment

__all__ = [
    "DATASETS",
    "INAT_CATEGORIES",
    "CIFAR100Local",
    "EpochPositions",
    "INatDataset",
    "RASampler",
    "SeededSamples",
    "ShardedEvalSampler",
    "SyntheticImages",
    "TransformConfig",
    "build_dataset",
    "build_transform",
    "dataset_classes",
    "image_folder",
    "scan_image_folder",
    "three_augment",
]
