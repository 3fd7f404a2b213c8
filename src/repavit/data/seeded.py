"""Per-sample random streams: the augmentation of a sample depends on ``(seed, epoch, process, position)`` only.

Augmentations (timm's RandAugment, random erasing, random-resized crop) draw from the global
``random``, NumPy and torch generators of whichever process loads the sample. With DataLoader
workers, which worker loads which sample, and in which order, then changes the augmentation. This
wrapper seeds the three generators for the duration of one ``__getitem__`` and restores them
afterwards. Keyed by the sample's position in its process's epoch order
(:class:`~repavit.data.EpochPositions` yields ``(index, position)``), so that

* a run resumed in the middle of an epoch (the sampler passing over the positions already seen)
  gives each remaining sample exactly the augmentation of the uninterrupted run, whatever
  ``--num_workers``;
* copies of one image (repeated augmentation) are augmented differently, as DeiT intends;
* the training loop's own random stream (stochastic depth, mixup) in the main process is not
  disturbed by samples loaded there (``--num_workers 0``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SeededSamples", "sample_seed"]


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A 32-bit seed for one sample of one epoch on one process (independent streams for different keys)."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank, position]).generate_state(1)[0])


class SeededSamples(Dataset):
    """``dataset[index]`` computed under generators seeded by :func:`sample_seed`; every other attribute forwarded.

    Indexed by ``(index, position)`` (from :class:`~repavit.data.EpochPositions`); a plain index is
    its own position. Call :meth:`set_epoch` before creating each epoch's DataLoader iterator
    (workers receive a copy of the dataset with the epoch set).
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0) -> None:
        self.dataset, self.seed, self.rank, self.epoch = dataset, int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        index, position = key if isinstance(key, tuple) else (key, key)
        state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        s = sample_seed(self.seed, self.epoch, self.rank, int(position))
        random.seed(s)
        np.random.seed(s)
        torch.default_generator.manual_seed(s)  # the CPU generator only: CUDA streams are the model's
        try:
            return self.dataset[index]
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.set_rng_state(state[2])

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed", "rank", "epoch"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
