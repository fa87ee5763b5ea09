"""Region labels for one crop: resample + flip + compact relabel in one numba pass, then sample k regions.

A crop's regions are the union over FH scales of the labels present in it. Instead of k float maps
[k, S, S] we return compact labels: ``region_labels`` int16 [Sc, S, S] (per scale, renumbered 0..n_s-1 in
order of first appearance in the crop) and k (scale, id) pairs; region i is
``region_labels[region_scale[i]] == region_id[i]`` (all zero where ``region_id[i] == -1``).
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch

__all__ = ["relabel_crop", "sample_regions", "region_patch_counts", "regions_in_patches", "region_maps",
           "reference_regions"]

_INT16_MAX = 32767
_scratch = threading.local()  # per-thread lookup tables: the kernels release the GIL


def _buffer(name: str, size: int, fill: int) -> np.ndarray:
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < size:
        buf = np.full(max(size, 1 << 16), fill, dtype=np.int32)
        setattr(_scratch, name, buf)
    return buf


@numba.njit(cache=True, nogil=True)
def _relabel_kernel(labels, ys, xs, lut, touched, out, counts):
    num_scales = labels.shape[0]
    status = 0
    for s in range(num_scales):
        n = 0
        for oy in range(ys.size):
            row = ys[oy]
            for ox in range(xs.size):
                v = np.int64(labels[s, row, xs[ox]])
                if v < 0 or v >= lut.size:
                    status = -1
                    break
                c = lut[v]
                if c < 0:
                    c = n
                    lut[v] = n
                    touched[n] = v
                    n += 1
                out[s, oy, ox] = c
            if status != 0:
                break
        counts[s] = n
        for t in range(n):  # leave the lookup table all -1 for the next call
            lut[touched[t]] = -1
        if n > 32768:
            status = -2
        if status != 0:
            return status
    return status


def relabel_crop(
    labels: np.ndarray, ys: np.ndarray, xs: np.ndarray, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``out[s, y, x] = compact(labels[s, ys[y], xs[x]])`` and the number of labels per scale, in one pass.

    ``labels`` integer [S, H, W] (uint8, uint16 or int32 ≥ 0); ``ys``/``xs`` int64 source indices (a crop,
    resize and flip are all index tables). Returns (int16 [S, len(ys), len(xs)], int64 counts [S]).
    """
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer [S, H, W], got {labels.dtype} {labels.shape}")
    if labels.dtype.itemsize <= 2 and labels.dtype.kind == "u":
        lut_size = 1 << (8 * labels.dtype.itemsize)
    else:
        lut_size = labels.shape[1] * labels.shape[2]  # FH labels are 0..n-1 with n <= H*W
    lut = _buffer("lut", lut_size, -1)
    touched = _buffer("touched", ys.size * xs.size, 0)
    if out is None:
        out = np.empty((labels.shape[0], ys.size, xs.size), dtype=np.int16)
    counts = np.empty(labels.shape[0], dtype=np.int64)
    status = _relabel_kernel(labels, ys, xs, lut, touched, out, counts)
    if status == -1:
        # (only signed or wide types get here: every uint8 / uint16 value has its table entry)
        raise ValueError(f"labels outside 0..{lut_size - 1} (dtype {labels.dtype}, {labels.shape[2]}x{labels.shape[1]} "
                         "pixels: FH labels are 0..n-1 with at most one segment per pixel)")
    if status == -2:
        raise ValueError(f"a crop holds more than {_INT16_MAX + 1} segments at one scale; int16 cannot hold them")
    return out, counts


@numba.njit(cache=True, nogil=True)
def _patch_count_kernel(compact, offsets, patch, last, result):
    num_scales, h, w = compact.shape
    ph, pw = h // patch, w // patch
    for s in range(num_scales):
        base = offsets[s]
        for py in range(ph):
            for px in range(pw):
                pid = py * pw + px
                for y in range(py * patch, (py + 1) * patch):
                    for x in range(px * patch, (px + 1) * patch):
                        r = base + compact[s, y, x]
                        if last[r] != pid:
                            last[r] = pid
                            result[r] += 1


def region_patch_counts(compact: np.ndarray, counts: np.ndarray, patch: int) -> np.ndarray:
    """Number of patch×patch cells each (scale, label) pair touches: int64 [counts.sum()] in pair order."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    last = np.full(int(offsets[-1]), -1, dtype=np.int64)
    result = np.zeros(int(offsets[-1]), dtype=np.int64)
    _patch_count_kernel(compact, offsets, patch, last, result)
    return result


@numba.njit(cache=True, nogil=True)
def _visible_kernel(compact, offsets, patch, patch_ids, result):
    num_scales, h, w = compact.shape
    pw = w // patch
    for s in range(num_scales):
        base = offsets[s]
        for t in range(patch_ids.size):
            py, px = divmod(patch_ids[t], pw)
            for y in range(py * patch, (py + 1) * patch):
                for x in range(px * patch, (px + 1) * patch):
                    result[base + compact[s, y, x]] = True


def regions_in_patches(compact: np.ndarray, counts: np.ndarray, patch: int, patch_ids: np.ndarray) -> np.ndarray:
    """bool [counts.sum()]: which (scale, label) pairs cover a pixel of one of ``patch_ids`` (row-major patches)."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    result = np.zeros(int(offsets[-1]), dtype=np.bool_)
    _visible_kernel(compact, offsets, patch, np.ascontiguousarray(patch_ids, dtype=np.int64), result)
    return result


def sample_regions(
    counts: np.ndarray, k: int, rng: np.random.Generator, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draws k (scale, id) pairs uniformly without replacement from the pairs present (scale-major order).

    Fewer than k pairs: the list is tiled and shuffled (the original's rule); none: ids are -1 (empty
    regions) and scales 0. ``keep`` (bool per pair) drops pairs first (``filter_small_patches``).
    Returns int64 region_scale [k], region_id [k].
    """
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    pairs = np.arange(offsets[-1], dtype=np.int64) if keep is None else np.flatnonzero(keep).astype(np.int64)
    n = pairs.size
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n == 0:
        return np.zeros(k, np.int64), np.full(k, -1, np.int64)
    if n < k:
        tiled = np.tile(pairs, (k + n - 1) // n)
        chosen = tiled[rng.permutation(tiled.size)[:k]]
    else:
        chosen = pairs[rng.permutation(n)[:k]]
    scale = np.searchsorted(offsets, chosen, side="right") - 1
    return scale.astype(np.int64), (chosen - offsets[scale]).astype(np.int64)


def region_maps(region_labels: torch.Tensor, region_scale: torch.Tensor, region_id: torch.Tensor) -> torch.Tensor:
    """Binary maps uint8 [B, k, H, W] (or [k, H, W] unbatched) from the compact form."""
    unbatched = region_labels.dim() == 3
    if unbatched:
        region_labels, region_scale, region_id = region_labels[None], region_scale[None], region_id[None]
    batch = torch.arange(region_labels.shape[0], device=region_labels.device)[:, None]
    chosen = region_labels[batch, region_scale]  # [B, k, H, W]
    ids = region_id[..., None, None]
    maps = ((chosen.to(torch.int64) == ids) & (ids >= 0)).to(torch.uint8)
    return maps[0] if unbatched else maps


def reference_regions(
    masks: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool, k: int, generator: torch.Generator
) -> torch.Tensor:
    """The original R-MAE mask path, for comparison: crop, torch nearest resize, flip, ``torch.unique`` per scale,
    binary maps concatenated, k drawn by ``randperm`` (tiled when fewer) → float [k, size, size]."""
    i, j, h, w = box
    masks = masks[:, i : i + h, j : j + w]
    if masks.dtype == torch.uint8:  # the original's files
        masks = torch.nn.functional.interpolate(masks[:, None], (size, size), mode="nearest")[:, 0]
    else:
        masks = torch.nn.functional.interpolate(masks[:, None].float(), (size, size), mode="nearest")[:, 0].to(masks)
    if flip:
        masks = masks.flip(-1)
    processed = []
    for mask in masks.unbind(0):
        processed.append(torch.unique(mask).unsqueeze(-1).unsqueeze(-1) == mask)
    masks = torch.cat(processed, dim=0)
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(k, size, size)
    if n < k:
        repeat = (k + n - 1) // n
        ids = torch.tensor(list(range(n)) * repeat)
        ids = ids[torch.randperm(ids.shape[0], generator=generator)][:k]
    else:
        ids = torch.randperm(n, generator=generator)[:k]
    return masks[ids].float()
