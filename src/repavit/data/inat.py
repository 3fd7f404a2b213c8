"""iNaturalist 2018 / 2019 in the official JSON layout.

Layout (``root`` = the folder the archives were extracted into)::

    root/train2018.json, root/val2018.json        # COCO-style: images, annotations (and categories)
    root/categories.json                          # optional: the category list with its taxonomy
    root/train_val2018/<supercategory>/<id>/<image>.jpg   # paths as written in each image's file_name

Labels are taken from the annotations (``image_id -> category_id``) and grouped at the
``category`` level of the taxonomy (``name`` = species, or ``genus``, ``family``, ... ``kingdom``).
Class indices follow the order in which each label first appears in the training annotations,
which is the order DeiT (and the RePaViT authors' code) uses, so their iNat heads line up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import default_loader

from ..errors import ArgumentError, UserError

__all__ = ["INAT_CATEGORIES", "INatDataset"]

INAT_CATEGORIES = ("kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name")


def _load_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"iNaturalist file missing: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


class INatDataset(Dataset):
    """iNaturalist images with labels at a chosen taxonomy level; yields ``(PIL image, label)``.

    Args:
        root: dataset folder (see module docstring).
        train: training split, else validation split.
        year: 2018 or 2019.
        category: taxonomy level of the labels, one of :data:`INAT_CATEGORIES`.
        transform: applied to the PIL image.
        loader: reads an image path into a PIL image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        year: int = 2018,
        category: str = "name",
        transform: Callable | None = None,
        loader: Callable = default_loader,
    ) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"iNaturalist folder not found: {root} (expected train{year}.json inside)")
        if category not in INAT_CATEGORIES:
            raise UserError(f"unknown iNaturalist category {category!r}; expected one of {', '.join(INAT_CATEGORIES)}")
        self.root, self.transform, self.loader = root, transform, loader
        train_data = _load_json(os.path.join(root, f"train{year}.json"))
        split_data = train_data if train else _load_json(os.path.join(root, f"val{year}.json"))
        cat_file = os.path.join(root, "categories.json")
        cats = _load_json(cat_file) if os.path.isfile(cat_file) else train_data.get("categories")
        if not cats:
            raise FileNotFoundError(
                f"no category list: expected {cat_file} or a 'categories' entry in train{year}.json"
            )
        try:
            by_id = {int(c["id"]): c for c in cats}
        except (KeyError, TypeError, ValueError):
            raise UserError("iNaturalist categories need an integer 'id' each") from None

        def label_of(category_id: Any) -> str:
            cat = by_id.get(int(category_id))
            if cat is None:
                raise UserError(f"annotation refers to category id {category_id}, which the category list lacks")
            if category not in cat:
                raise ArgumentError(
                    "category {v0} has no '{v1}' field (choose another {inat_category})", v0=cat["id"], v1=category
                )
            return str(cat[category])

        index: dict[str, int] = {}
        for ann in train_data.get("annotations", []):
            index.setdefault(label_of(ann["category_id"]), len(index))
        if not index:
            raise UserError(f"train{year}.json has no annotations")
        self.classes = list(index)

        image_label = {ann["image_id"]: ann["category_id"] for ann in split_data.get("annotations", [])}
        self.samples: list[tuple[str, int]] = []
        for img in split_data.get("images", []):
            if img["id"] not in image_label:
                raise UserError(f"image {img['id']} ({img.get('file_name')}) has no annotation")
            label = label_of(image_label[img["id"]])
            if label not in index:
                raise UserError(f"label {label!r} of image {img['file_name']} never occurs in the training split")
            self.samples.append((os.path.join(root, img["file_name"]), index[label]))
        if not self.samples:
            raise UserError(f"{'train' if train else 'val'}{year}.json lists no images")
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = self.loader(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, target
