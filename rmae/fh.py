"""Felzenszwalb–Huttenlocher segmentation, partition-identical to ``skimage.segmentation.felzenszwalb``.

The work runs in C++ (``rmae._fh``) with the GIL released; this module validates inputs and converts
dtypes exactly as scikit-image does (``img_as_float64``), so for every image and parameter set the
partition equals scikit-image 0.26's. Labels are int32, numbered 0..n-1 in raster order of each
segment's first pixel (scikit-image numbers them by an internal root index; the partition is the same).

Exactly equal edge costs: scikit-image sorts the edges with numpy's default argsort, which is not
stable and whose tie order depends on the CPU and the numpy build (numpy dispatches AVX-512, AVX2 or
baseline sorts), so on some inputs stock scikit-image's own partition changes from one machine to
another. Smoothing does not remove ties: mirror-symmetric neighbourhoods, straight boundaries between
flat areas and letterboxes give exactly equal costs (0 to 1.7% of the edges of scikit-image's colour
photos at sigma 0.8, up to 11% in its drawings). Most ties decide nothing, but on blocky or quantised images (and uint8 with sigma=0)
some do. ``tie_order`` chooses:

* ``"stable"`` (default): ties in scikit-image's edge order, the result of scikit-image with a stable
  argsort; the same on every machine, and the fast path.
* ``"numpy"``: the order numpy's default argsort gives on this machine, as stock scikit-image sorts:
  the same partition as ``skimage.segmentation.felzenszwalb`` here for every input, at the price of
  numpy's sort of all the edges (640x480 photos on a 2-core VM: 170 ms against 24.5 ms stable;
  scikit-image 387 ms; benchmarks/RESULTS.md).

Inputs scikit-image takes and rmae refuses, on purpose: negative or non-finite scale, sigma or
min_size, and images holding NaN or infinity (scikit-image segments them into meaningless partitions).
"""
from __future__ import annotations

import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np

from rmae import _fh
from rmae.cores import usable_cores

__all__ = ["felzenszwalb", "felzenszwalb_multi", "felzenszwalb_batch", "gaussian_weights", "default_min_sizes",
           "TIE_ORDERS"]

TIE_ORDERS = ("stable", "numpy")

MAX_MIN_SIZE = 2**63 - 1  # the C++ side takes int64; any min_size >= an image's pixel count acts as that count


def _real(value, name: str):
    """``value`` as a real scalar, unchanged where it is one (a numpy scalar keeps its type, which
    decides the precision scipy computes the kernel in); a 0-d numeric array becomes its numpy scalar.
    TypeError for anything else, as scikit-image raises for a non-number."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real number, got {value!r} ({value.dtype})")
        return value
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}"[:200])
    try:
        float(value)
    except OverflowError:  # an int or Fraction beyond the float range
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}"[:200]) from None
    return value


def _check_sigma(sigma):
    sigma = _real(sigma, "sigma")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return sigma


def gaussian_weights(sigma: float, truncate: float = 4.0) -> list[float]:
    """scipy.ndimage's Gaussian kernel for ``sigma``, or [] when scipy would skip the axis.

    Computed exactly as ``scipy.ndimage.gaussian_filter1d`` does (radius ``int(truncate * float(sigma)
    + 0.5)``, then ``_gaussian_kernel1d(sigma, 0, radius)[::-1]`` as float64), on the sigma object
    itself: a numpy float32 or float16 sigma squares and divides in its own precision there, and so here.
    """
    sigma = _check_sigma(sigma)
    if not sigma > 1e-15:  # gaussian_filter's test for skipping an axis
        return []
    radius = int(truncate * float(sigma) + 0.5)
    # scipy.ndimage._filters._gaussian_kernel1d(sigma, 0, radius), expression for expression.
    sigma2 = sigma * sigma
    try:
        x = np.arange(-radius, radius + 1)
        phi_x = np.exp(-0.5 / sigma2 * x**2)
    except (ValueError, MemoryError) as error:  # numpy cannot hold 2 * radius + 1 taps
        raise ValueError(f"sigma {float(sigma):g} is too large: its Gaussian kernel of radius {float(radius):.3g} "
                         f"(4 sigma) cannot be built ({type(error).__name__}: {error})") from None
    phi_x = phi_x / phi_x.sum()
    # correlate1d (the kernel reversed for correlation) takes the weights as float64.
    return np.asarray(phi_x[::-1], dtype=np.float64).tolist()


def _as_image(image) -> np.ndarray:
    """Validates ``image`` and returns a C-contiguous uint8 or float64 [H, W, C] array."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array [H, W] or [H, W, C], got {type(image).__name__}")
    # A plain ndarray of the same data: a masked array's mask is dropped (scikit-image segments the
    # values underneath it, masked or not), as is np.matrix's type.
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be 2-D [H, W] or 3-D channels-last [H, W, C], got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image dtype must be bool, integer or floating point, got {image.dtype}")
    if image.dtype.kind == "f" and image.dtype.itemsize > 8:
        # np.longdouble (float96/float128): scikit-image's img_as_float64 refuses it with this message.
        raise ValueError(f"Cannot convert from {image.dtype} to float64 (long double images are not supported)")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[0] * image.shape[1] >= _fh.MAX_PIXELS:
        raise ValueError(f"image has {image.shape[0] * image.shape[1]} pixels; at most {_fh.MAX_PIXELS - 1}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind == "f":
        # exact for float16/32/64; aligned: a view at an odd byte offset would be read as a misaligned double*
        converted = np.require(image, dtype=np.float64, requirements="CA")
        if not np.isfinite(converted).all():  # checked on what the C++ side reads
            raise ValueError("image contains NaN or infinite values")
        return converted
    from skimage.util import img_as_float64  # integer and bool types scale exactly as scikit-image

    return np.ascontiguousarray(img_as_float64(image))


def _check_scale(scale) -> float:
    scale = _real(scale, "scale")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def _check_min_size(min_size) -> int:
    if isinstance(min_size, np.ndarray) and min_size.ndim == 0:
        min_size = min_size[()]
    if isinstance(min_size, (bool, np.bool_)) or not isinstance(min_size, numbers.Integral):
        if not (isinstance(min_size, numbers.Real) and float(min_size).is_integer()):
            raise TypeError(f"min_size must be an integer, got {min_size!r}")
    value = int(min_size)  # range-checked as an int: numpy would compare np.float64(2**63) <= 2**63 - 1 as True
    if not 0 <= value <= MAX_MIN_SIZE:
        raise ValueError(f"min_size must be in 0..{MAX_MIN_SIZE} (2**63 - 1), got {min_size!r}")
    return value


def default_min_sizes(scales: Sequence[float]) -> list[int]:
    """The R-MAE default: each min_size equal to its scale, capped at ``_fh.MAX_PIXELS``.

    The cap changes no partition: a segment is absorbed when its size is below min_size, and every
    segment of an image with n < MAX_PIXELS pixels is smaller than n, so all min_sizes >= n act alike.
    """
    return [min(int(_check_scale(scale)), _fh.MAX_PIXELS) for scale in scales]


def _listed(values, name: str) -> list:
    """A sequence (or iterable) of numbers as a list; one number or a string is a TypeError that says so."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, one per scale (e.g. [500, 1000, 1500]), got "
                        f"{type(values).__name__} {values!r}"[:200])
    return list(values)


def _check_params(scales: Sequence[float], sigma, min_sizes: Sequence[int]) -> tuple[list[float], list[int]]:
    _check_sigma(sigma)
    if len(scales) != len(min_sizes):
        raise ValueError(f"got {len(scales)} scales but {len(min_sizes)} min_sizes")
    if len(scales) == 0:
        raise ValueError("at least one scale is required")
    checked_scales = [_check_scale(scale) for scale in scales]
    checked_sizes = [_check_min_size(min_size) for min_size in min_sizes]
    return checked_scales, checked_sizes


def _check_num_threads(num_threads) -> int:
    if isinstance(num_threads, np.ndarray) and num_threads.ndim == 0:
        num_threads = num_threads[()]
    if isinstance(num_threads, (bool, np.bool_)) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads must be an integer, got {num_threads!r}")
    num_threads = int(num_threads)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return num_threads


def _as_batch_image(index: int, image) -> np.ndarray:
    """_as_image for image ``index`` of a batch: its errors say which image, keeping their type."""
    try:
        return _as_image(image)
    except (TypeError, ValueError) as error:
        base = TypeError if isinstance(error, TypeError) else ValueError
        message = f"image {index}: {error}"
        try:
            raised = type(error)(message)
        except Exception:  # a subclass that takes other arguments (numpy's UFuncTypeError...)
            raised = base(message)
        raise raised from error


def _check_tie_order(tie_order) -> str:
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order must be one of {TIE_ORDERS}, got {tie_order!r}")
    return tie_order


def _segment_in_numpy_order(image: np.ndarray, weights: list[float], scales: list[float],
                            min_sizes: list[int]) -> np.ndarray:
    """tie_order="numpy": labels [S, H, W] with the edges in the order ``np.argsort`` (numpy's default kind, as
    scikit-image calls it) gives the edge costs on this machine."""
    costs, codes = _fh.edge_costs(image, weights)  # in scikit-image's edge order, bit-identical to its costs
    order = np.argsort(costs)
    return _fh.segment_in_order(image.shape[0], image.shape[1], costs[order], codes[order], scales, min_sizes)


def felzenszwalb(image: np.ndarray, scale: float = 1, sigma: float = 0.8, min_size: int = 20, *,
                 tie_order: str = "stable") -> np.ndarray:
    """FH segmentation of a 2-D grayscale or channels-last [H, W, C] image (uint8, any int, bool or float).

    Same parameters as ``skimage.segmentation.felzenszwalb``. Returns int32 labels [H, W]. ``tie_order``: how
    exactly equal edge costs are ordered (see the module's docstring; "numpy" reproduces stock scikit-image on
    this machine, slower).
    """
    return felzenszwalb_multi(image, [scale], sigma, [min_size], tie_order=tie_order)[0]


def felzenszwalb_multi(
    image: np.ndarray, scales: Sequence[float], sigma: float = 0.8, min_sizes: Sequence[int] | None = None, *,
    tie_order: str = "stable",
) -> np.ndarray:
    """FH at several scales sharing one smoothing and one edge sort: int32 labels [S, H, W].

    ``min_sizes`` defaults to the scales themselves (the R-MAE recipes). Each [s] equals
    ``felzenszwalb(image, scales[s], sigma, min_sizes[s], tie_order=tie_order)``.
    """
    scales = _listed(scales, "scales")  # an iterator is read once, also when it gives the default min_sizes
    if min_sizes is None:
        min_sizes = default_min_sizes(scales)
    scales, min_sizes = _check_params(scales, sigma, _listed(min_sizes, "min_sizes"))
    image = _as_image(image)
    if _check_tie_order(tie_order) == "numpy":
        return _segment_in_numpy_order(image, gaussian_weights(sigma), scales, min_sizes)
    return _fh.segment(image, gaussian_weights(sigma), scales, min_sizes)


def felzenszwalb_batch(
    images: Sequence[np.ndarray],
    scales: Sequence[float],
    sigma: float = 0.8,
    min_sizes: Sequence[int] | None = None,
    num_threads: int | None = None,
    *,
    tie_order: str = "stable",
) -> list[np.ndarray]:
    """``felzenszwalb_multi`` over many images on ``num_threads`` threads (default: all cores), GIL released
    (with ``tie_order="numpy"`` numpy's argsort holds it part of the time)."""
    scales = _listed(scales, "scales")  # an iterator is read once, also when it gives the default min_sizes
    if min_sizes is None:
        min_sizes = default_min_sizes(scales)
    scales, min_sizes = _check_params(scales, sigma, _listed(min_sizes, "min_sizes"))
    num_threads = _check_num_threads(usable_cores() if num_threads is None else num_threads)
    tie_order = _check_tie_order(tie_order)
    if isinstance(images, np.ndarray) and images.dtype != object:  # it would iterate as rows, each a 2-D image
        raise TypeError(f"images must be a sequence of images (a list of arrays), got one array of shape "
                        f"{images.shape}; use felzenszwalb_multi for one image")
    arrays = [_as_batch_image(i, image) for i, image in enumerate(images)]
    num_threads = min(num_threads, max(len(arrays), 1))  # more threads than images would only idle
    weights = gaussian_weights(sigma)
    if tie_order == "numpy":
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(lambda image: _segment_in_numpy_order(image, weights, scales, min_sizes), arrays))
    return _fh.segment_batch(arrays, weights, scales, min_sizes, num_threads)
