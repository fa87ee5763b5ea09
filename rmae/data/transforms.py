"""Joint image/label geometry: torchvision's RandomResizedCrop parameters, resize index tables, normalisation.

The image is cropped and resized by Pillow exactly as torchvision does for a PIL image
(``img.crop(box).resize(size, BICUBIC)``); labels are resampled by index tables (``nearest_indices``)
and the flip and normalisation are fused into one numba pass (``to_normalized_chw``).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "random_resized_crop_params",
    "nearest_indices",
    "crop_resize",
    "to_normalized_chw",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN32 = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD32 = np.array(IMAGENET_STD, dtype=np.float32)


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w); 10 tries, then a centre crop.

    The same algorithm and arithmetic, drawing from ``rng`` instead of torch's global generator.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def nearest_indices(start: int, length: int, size: int, mode: str = "center") -> np.ndarray:
    """Source indices [size] of nearest-neighbour resampling of ``length`` pixels from ``start`` to ``size``.

    ``center``: Pillow's NEAREST (pixel centres, ``floor((x + 0.5) * length / size)``, accumulated in
    float64 as Pillow does) — aligned with the bicubic image. ``floor``: torch ``interpolate(mode="nearest")``
    (``floor(x * float32(length / size))``), what the original R-MAE code applies to its masks; it is shifted
    by up to half a source pixel against the image.
    """
    if mode == "center":
        step = length / size
        coords = np.empty(size, dtype=np.float64)
        coords[0] = step * 0.5
        coords[1:] = step
        idx = np.cumsum(coords).astype(np.int64)  # sequential sum, like Pillow's xo += a[0]
    elif mode == "floor":
        if length == size:
            idx = np.arange(size, dtype=np.int64)
        else:
            scale = np.float32(np.float32(length) / np.float32(size))
            idx = np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int64)
    else:
        raise ValueError(f"label resize mode must be 'center' or 'floor', got {mode!r}")
    np.minimum(idx, length - 1, out=idx)
    return idx + start


def crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """torchvision ``F.resized_crop`` on a PIL image: crop (top, left, h, w), then bicubic resize to size×size."""
    i, j, h, w = box
    if (i, j, h, w) != (0, 0, image.height, image.width):
        image = image.crop((j, i, j + w, i + h))
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.BICUBIC)


def _normalize_table() -> np.ndarray:
    """float32 [3, 256]: the normalised value of every uint8 level, computed with torchvision's float32 ops."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    return np.stack([(levels - _MEAN32[c]) / _STD32[c] for c in range(3)]).astype(np.float32)


_TABLE = _normalize_table()


@numba.njit(cache=True, nogil=True)
def _normalize_kernel(rgb, flip, table, out):
    h, w, _ = rgb.shape
    for c in range(3):
        row_table = table[c]
        for y in range(h):
            for x in range(w):
                sx = w - 1 - x if flip else x
                out[c, y, x] = row_table[rgb[y, sx, c]]


def to_normalized_chw(rgb: np.ndarray, flip: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [3, H, W], optionally flipped left-right, ``(x/255 - mean)/std``.

    Bit-identical to torchvision ``ToTensor`` then ``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` (float32 ops,
    tabulated once for the 256 levels).
    """
    if out is None:
        out = np.empty((3, rgb.shape[0], rgb.shape[1]), dtype=np.float32)
    _normalize_kernel(rgb, bool(flip), _TABLE, out)
    return out
