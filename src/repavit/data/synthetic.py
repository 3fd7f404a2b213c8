"""A deterministic synthetic image dataset for smoke tests (no files, learnable labels)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError

__all__ = ["SyntheticImages"]


class SyntheticImages(Dataset):
    """RGB PIL images whose class is visible: a per-class colour layout plus per-image noise.

    Sample ``i`` is the same on every call and machine (its generator is seeded by ``(seed, split, i)``),
    and its label is ``i % num_classes``, so classes are balanced. A small model learns it in a few
    steps, which makes it useful to check that training actually trains.

    Args:
        num_samples: dataset length.
        num_classes: number of classes.
        img_size: side of the square images.
        split: ``"train"`` or ``"val"`` (different images, same class layouts).
        seed: seed of the class layouts and of the images.
        transform: applied to the PIL image.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 10,
        img_size: int = 32,
        split: str = "train",
        seed: int = 0,
        transform: Callable | None = None,
    ) -> None:
        if num_samples < 1 or num_classes < 1 or img_size < 1:
            raise UserError(
                f"synthetic dataset needs positive sizes, got num_samples={num_samples}, "
                f"num_classes={num_classes}, img_size={img_size}"
            )
        self.num_samples, self.num_classes, self.img_size = num_samples, num_classes, img_size
        self.split_id = {"train": 0, "val": 1}.get(split)
        if self.split_id is None:
            raise UserError(f"unknown split {split!r}; expected 'train' or 'val'")
        self.seed = seed
        self.transform = transform
        self.classes = [f"class_{i}" for i in range(num_classes)]
        # One 4x4 colour layout per class, blown up to the image size.
        layouts = np.random.default_rng(seed).uniform(0, 255, size=(num_classes, 4, 4, 3))
        reps = -(-img_size // 4)
        self._layouts = np.kron(layouts, np.ones((1, reps, reps, 1)))[:, :img_size, :img_size]
        self.targets = [i % num_classes for i in range(num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        target = self.targets[index]
        rng = np.random.default_rng((self.seed, self.split_id, index))
        noise = rng.normal(0.0, 40.0, size=(self.img_size, self.img_size, 3))
        pixels = np.clip(self._layouts[target] + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, mode="RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, target
