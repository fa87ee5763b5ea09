"""Bounded in-memory cache of one rank's shard: encoded image bytes and mask file bytes.

Filled once in the main process before the loader workers start, in one contiguous numpy buffer, so
forked workers share it (no per-item Python objects whose reference counts would copy pages).
Items are taken in shard order until ``limit_bytes`` is reached; the rest is read from disk.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rmae.masks import MASK_SUFFIX, ORIGINAL_SUFFIX, find_mask, mask_path

from .sources import ImageList

__all__ = ["ShardCache"]

class ShardCache:
    def __init__(self, images: ImageList, indices, limit_bytes: int, masks: bool = True, num_threads: int = 8):
        if limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
        self.limit_bytes = int(limit_bytes)
        self.total_items = len(indices)
        chosen, img_sizes, mask_sizes, mask_kinds = [], [], [], []
        used = 0
        if images.arrays is None:
            for index in indices:
                index = int(index)
                try:
                    img_size = os.stat(images.image_file(index)).st_size
                except OSError:
                    continue  # read (and reported) from disk by the dataset
                kind, msize = 0, 0
                if masks:
                    found = find_mask(images.mask_dir(index), images.relative(index))
                    if found is not None:
                        kind = 1 if found.name.endswith(MASK_SUFFIX) else 2
                        msize = os.stat(found).st_size
                if used + img_size + msize > self.limit_bytes:
                    break
                used += img_size + msize
                chosen.append(index)
                img_sizes.append(img_size)
                mask_sizes.append(msize)
                mask_kinds.append(kind)
        order = np.argsort(np.asarray(chosen, dtype=np.int64), kind="stable")
        self.keys = np.asarray(chosen, dtype=np.int64)[order]
        self.img_len = np.asarray(img_sizes, dtype=np.int64)[order]
        self.mask_len = np.asarray(mask_sizes, dtype=np.int64)[order]
        self.mask_kind = np.asarray(mask_kinds, dtype=np.int8)[order]
        lengths = np.stack([self.img_len, self.mask_len], 1).reshape(-1) if len(self.keys) else np.zeros(0, np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self.img_off = offsets[0:-1:2]
        self.mask_off = offsets[1:-1:2] if len(self.keys) else np.zeros(0, np.int64)
        self.buffer = np.empty(int(offsets[-1]), dtype=np.uint8)
        self.images = images

        def fill(position: int) -> bool:
            index = int(self.keys[position])
            parts = [(images.image_file(index), self.img_off[position], self.img_len[position])]
            if self.mask_kind[position]:
                parts.append((self._mask_name(index, position), self.mask_off[position], self.mask_len[position]))
            try:
                for path, offset, length in parts:
                    with open(path, "rb") as f:
                        # the size now, not the one listed: a file rewritten since (longer or shorter) is not cut
                        if os.fstat(f.fileno()).st_size != length:
                            return False
                        if f.readinto(memoryview(self.buffer)[offset : offset + length]) != length:
                            return False
            except OSError:
                return False
            return True

        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            ok = np.fromiter(pool.map(fill, range(len(self.keys))), dtype=bool, count=len(self.keys))
        self.valid = ok  # an item that changed size or vanished while reading is served from disk

    def _mask_name(self, index: int, position: int):
        if self.mask_kind[position] == 1:
            return mask_path(self.images.mask_dir(index), self.images.relative(index))
        return self.images.mask_dir(index) / Path(self.images.relative(index)).with_suffix(ORIGINAL_SUFFIX)

    def _position(self, index: int) -> int:
        position = int(np.searchsorted(self.keys, index))
        if position < len(self.keys) and self.keys[position] == index and self.valid[position]:
            return position
        return -1

    def image(self, index: int) -> memoryview | None:
        position = self._position(index)
        if position < 0:
            return None
        return memoryview(self.buffer)[self.img_off[position] : self.img_off[position] + self.img_len[position]]

    def mask(self, index: int):
        """(bytes, file path) of the cached mask, or None."""
        position = self._position(index)
        if position < 0 or not self.mask_kind[position]:
            return None
        data = memoryview(self.buffer)[self.mask_off[position] : self.mask_off[position] + self.mask_len[position]]
        return data, self._mask_name(index, position)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    @property
    def items(self) -> int:
        return int(self.valid.sum())

    def report(self) -> str:
        return (f"shard cache: {self.items}/{self.total_items} items, {self.nbytes / 2**20:.1f} MiB "
                f"(limit {self.limit_bytes / 2**20:.1f} MiB)")
