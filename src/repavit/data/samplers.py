"""Samplers: repeated augmentation and exact (unpadded) sharded evaluation for distributed runs, and
the rest of an interrupted epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import UserError

__all__ = ["EpochPositions", "RASampler", "ShardedEvalSampler"]


class RASampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al. 2020; used by DeiT): each image appears ``repeats`` times per
    epoch, its copies spread over different processes, which augment them differently.

    Every process draws ``floor(len(dataset) / num_replicas)`` indices per epoch, so an epoch has as many
    steps as without repetition (and 1/repeats of the distinct images). DeiT also rounds the epoch down to
    a multiple of 256 images, which empties small datasets; this sampler does not.

    Args:
        dataset_len: number of samples in the dataset.
        num_replicas: number of processes.
        rank: this process.
        shuffle: permute the dataset each epoch (seeded by ``seed + epoch``, the same on every process).
        repeats: copies of each sample per epoch.
        seed: base seed.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int,
        rank: int,
        shuffle: bool = True,
        repeats: int = 3,
        seed: int = 0,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise UserError(f"rank {rank} out of range for {num_replicas} replicas")
        if repeats < 1:
            raise UserError(f"repeats must be >= 1, got {repeats}")
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.shuffle, self.repeats, self.seed = shuffle, repeats, seed
        self.epoch = 0
        self.total = math.ceil(dataset_len * repeats / num_replicas) * num_replicas
        self.num_samples = dataset_len // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g)
        else:
            order = torch.arange(self.dataset_len)
        rep = order.repeat_interleave(self.repeats)  # i, i, i, j, j, j, ...
        rep = torch.cat((rep, rep[: self.total - len(rep)]))  # pad so every process gets the same count
        mine = rep[self.rank : self.total : self.num_replicas]
        return iter(mine[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample on exactly one process, no padding.

    torch's ``DistributedSampler`` pads with duplicates so that all processes have equal length, which
    biases the accuracy; here the shards differ by at most one sample and the metrics are summed exactly.
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise UserError(f"rank {rank} out of range for {num_replicas} replicas")
        self.indices = list(range(rank, dataset_len, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochPositions(Sampler[tuple[int, int]]):
    """``(index, position)`` for each index of ``sampler``'s epoch order, from position :attr:`skip` on.

    The position lets :class:`~repavit.data.SeededSamples` give every sample of an epoch its own
    random stream, copies of one image included (repeated augmentation sends them to different
    processes or positions). ``skip`` resumes an interrupted epoch: the wrapped sampler must produce
    the same order as in the interrupted run (seeded generator, ``set_epoch`` called), so that the
    skipped positions are exactly those already trained on; they are passed over without loading.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield int(index), position

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)  # type: ignore[arg-type]
