"""Distributed-aware infinite samplers that yield (dataset index, global draw number) keys.

``InfiniteSampler`` (the official default): one endless stream of per-epoch permutations of the whole
dataset, rank r taking global positions r, r + world_size, ...  ``ShardSampler``: rank r owns the fixed
shard ``range(r, N, world_size)`` and loops over it in a fresh permutation each epoch (pair it with a
``ShardCache``). Both are deterministic given (seed, rank, world_size) and resume from a per-rank sample
position: ``start=`` or ``load_state_dict``. The draw number seeds the sample's augmentation.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["InfiniteSampler", "ShardSampler", "SequentialShardSampler", "shard_indices"]

# Each random stream seeds numpy with [seed, tag, ...], its kind's own non-zero tag right after the seed: numpy's
# SeedSequence ignores trailing zeros ([s, 1] seeds as [s, 1, 0]), so without distinct tags an epoch's permutation
# could be the same stream as some sample's augmentation.
DRAW_STREAM = 1  # a sample's augmentation: [seed, 1, draw] (RegionDataset)
INFINITE_STREAM = 2  # InfiniteSampler's permutation of an epoch: [seed, 2, epoch]
SHARD_STREAM = 3  # ShardSampler's permutation of a rank's shard in an epoch: [seed, 3, epoch, rank]
INDEX_STREAM = 4  # augmentation of a plain integer index: [seed, 4, epoch, index] (RegionDataset)


def shard_indices(size: int, rank: int, world_size: int) -> np.ndarray:
    """The fixed shard of ``rank``: every world_size-th index starting at rank (disjoint, covering all)."""
    return np.arange(rank, size, world_size, dtype=np.int64)


class _PositionSampler(Sampler):
    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 start: int = 0):
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.start = int(start)
        self.position = self.start  # per-rank samples yielded so far (the DataLoader prefetches ahead)
        self._cached_epoch, self._cached_order = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            self._cached_order, self._cached_epoch = self._order(epoch), epoch
        return self._cached_order

    def set_epoch(self, epoch: int) -> None:
        """No-op (the stream is endless; epochs follow from the position). Kept for DataLoader-style callers."""

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state['position']`` (a per-rank sample count). Prefer passing the number of samples the
        trainer actually consumed (steps × per-rank batch): the loader's prefetch runs ahead of ``position``."""
        self.start = self.position = int(state["position"])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        while True:
            index, draw = self._at(position)
            position += 1
            self.position = position
            yield index, draw


class InfiniteSampler(_PositionSampler):
    """Endless per-epoch permutations of range(size); rank r takes global positions r, r + W, r + 2W, ..."""

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size, dtype=np.int64)
        return np.random.default_rng([self.seed, INFINITE_STREAM, epoch]).permutation(self.size)

    def _at(self, position: int) -> tuple[int, int]:
        draw = position * self.world_size + self.rank
        epoch, offset = divmod(draw, self.size)
        return int(self._epoch_order(epoch)[offset]), draw


class ShardSampler(_PositionSampler):
    """This rank's fixed shard ``range(rank, size, world_size)``, reshuffled every pass, endlessly."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 start: int = 0):
        super().__init__(size, rank, world_size, seed, shuffle, start)
        self.indices = shard_indices(self.size, self.rank, self.world_size)
        if self.indices.size == 0:
            raise ValueError(f"rank {rank} of {world_size} has an empty shard of a {size}-image dataset")

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, SHARD_STREAM, epoch, self.rank])
        return self.indices[rng.permutation(self.indices.size)]

    def _at(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.indices.size)
        return int(self._epoch_order(epoch)[offset]), position * self.world_size + self.rank


class SequentialShardSampler(Sampler):
    """One pass over this rank's shard in order (evaluation, visualisation): keys (index, index), so a given
    image always gets the same draw whatever the number of ranks."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.indices = shard_indices(int(size), int(rank), int(world_size))

    def __len__(self) -> int:
        return int(self.indices.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices.tolist():
            yield index, index
