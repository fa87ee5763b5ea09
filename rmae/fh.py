"""Felzenszwalb–Huttenlocher segmentation, partition-identical to ``skimage.segmentation.felzenszwalb``.

The work runs in C++ (``rmae._fh``) with the GIL released; this module validates inputs and converts
dtypes exactly as scikit-image does (``img_as_float64``), so for every image and parameter set the
partition equals scikit-image 0.26's. Labels are int32, numbered 0..n-1 in raster order of each
segment's first pixel (scikit-image numbers them by an internal root index; the partition is the same).

Exactly equal edge costs are processed in scikit-image's edge order (a stable sort). scikit-image
sorts with numpy's default argsort, which is not stable and whose tie order depends on the CPU (numpy
dispatches AVX-512, AVX2 or baseline sorts): on tie-heavy inputs (uint8 images with sigma=0) its own
partition changes from one machine to another. Ours equals scikit-image's with a stable argsort
everywhere, and stock scikit-image's wherever the tie order decides nothing (every photo with sigma > 0
in the tests).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from rmae import _fh, usable_cores

__all__ = ["felzenszwalb", "felzenszwalb_multi", "felzenszwalb_batch", "gaussian_weights", "default_min_sizes"]

MAX_MIN_SIZE = 2**63 - 1  # the C++ side takes int64; any min_size >= an image's pixel count acts as that count


def gaussian_weights(sigma: float) -> list[float]:
    """scipy.ndimage's Gaussian kernel for ``sigma`` (truncate 4), or [] when scipy would skip the axis."""
    if sigma <= 1e-15:
        return []
    radius = int(4.0 * float(sigma) + 0.5)
    # The same numpy expression as scipy.ndimage._filters._gaussian_kernel1d, so the taps are bit-identical.
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x**2)
    return (phi / phi.sum()).tolist()


def _as_image(image) -> np.ndarray:
    """Validates ``image`` and returns a C-contiguous uint8 or float64 [H, W, C] array."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array [H, W] or [H, W, C], got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be 2-D [H, W] or 3-D channels-last [H, W, C], got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image dtype must be bool, integer or floating point, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[0] * image.shape[1] >= _fh.MAX_PIXELS:
        raise ValueError(f"image has {image.shape[0] * image.shape[1]} pixels; at most {_fh.MAX_PIXELS - 1}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        return np.ascontiguousarray(image, dtype=np.float64)
    from skimage.util import img_as_float64  # integer and bool types scale exactly as scikit-image

    return np.ascontiguousarray(img_as_float64(image))


def _check_scale(scale) -> float:
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def default_min_sizes(scales: Sequence[float]) -> list[int]:
    """The R-MAE default: each min_size equal to its scale, capped at ``_fh.MAX_PIXELS``.

    The cap changes no partition: a segment is absorbed when its size is below min_size, and every
    segment of an image with n < MAX_PIXELS pixels is smaller than n, so all min_sizes >= n act alike.
    """
    return [min(int(_check_scale(scale)), _fh.MAX_PIXELS) for scale in scales]


def _check_params(scales: Sequence[float], sigma: float, min_sizes: Sequence[int]) -> tuple[list[float], list[int]]:
    if not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if len(scales) != len(min_sizes):
        raise ValueError(f"got {len(scales)} scales but {len(min_sizes)} min_sizes")
    if len(scales) == 0:
        raise ValueError("at least one scale is required")
    checked_scales, checked_sizes = [], []
    for scale, min_size in zip(scales, min_sizes):
        _check_scale(scale)
        if isinstance(min_size, (bool, np.bool_)) or not isinstance(min_size, numbers.Integral):
            if not (isinstance(min_size, numbers.Real) and float(min_size).is_integer()):
                raise TypeError(f"min_size must be an integer, got {min_size!r}")
        if not 0 <= min_size <= MAX_MIN_SIZE:
            raise ValueError(f"min_size must be in 0..{MAX_MIN_SIZE} (2**63 - 1), got {min_size!r}")
        checked_scales.append(float(scale))
        checked_sizes.append(int(min_size))
    return checked_scales, checked_sizes


def felzenszwalb(image: np.ndarray, scale: float = 1, sigma: float = 0.8, min_size: int = 20) -> np.ndarray:
    """FH segmentation of a 2-D grayscale or channels-last [H, W, C] image (uint8, any int, bool or float).

    Same parameters as ``skimage.segmentation.felzenszwalb``. Returns int32 labels [H, W].
    """
    return felzenszwalb_multi(image, [scale], sigma, [min_size])[0]


def felzenszwalb_multi(
    image: np.ndarray, scales: Sequence[float], sigma: float = 0.8, min_sizes: Sequence[int] | None = None
) -> np.ndarray:
    """FH at several scales sharing one smoothing and one edge sort: int32 labels [S, H, W].

    ``min_sizes`` defaults to the scales themselves (the R-MAE recipes). Each [s] equals
    ``felzenszwalb(image, scales[s], sigma, min_sizes[s])``.
    """
    if min_sizes is None:
        min_sizes = default_min_sizes(scales)
    scales, min_sizes = _check_params(list(scales), sigma, list(min_sizes))
    return _fh.segment(_as_image(image), gaussian_weights(sigma), scales, min_sizes)


def felzenszwalb_batch(
    images: Sequence[np.ndarray],
    scales: Sequence[float],
    sigma: float = 0.8,
    min_sizes: Sequence[int] | None = None,
    num_threads: int | None = None,
) -> list[np.ndarray]:
    """``felzenszwalb_multi`` over many images on ``num_threads`` threads (default: all cores), GIL released."""
    if min_sizes is None:
        min_sizes = default_min_sizes(scales)
    scales, min_sizes = _check_params(list(scales), sigma, list(min_sizes))
    if num_threads is None:
        num_threads = usable_cores()
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    arrays = [_as_image(image) for image in images]
    return _fh.segment_batch(arrays, gaussian_weights(sigma), scales, min_sizes, int(num_threads))
