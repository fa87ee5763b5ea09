"""Image and mask decoding, from a path or from bytes held in memory (the shard cache).

Images: Pillow, full decode (no ``Image.draft``: DCT-domain downscaling does not equal a full decode
followed by the bicubic resize), then ``.convert("RGB")`` as the original code does for every mode
(L, LA, P, RGBA, CMYK, I;16, ...).
"""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import zstandard
from PIL import Image

from rmae.masks import MASK_SUFFIX, MaskError

__all__ = ["CorruptImageError", "decode_image", "decode_labels"]


class CorruptImageError(OSError):
    """An image file that cannot be decoded (truncated, not an image, unreadable)."""


def decode_image(source: str | os.PathLike | bytes | memoryview, name: str | os.PathLike | None = None) -> Image.Image:
    """A fully decoded RGB PIL image from a path or encoded bytes; CorruptImageError names the file."""
    label = name if name is not None else source if not isinstance(source, (bytes, memoryview)) else "<bytes>"
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, memoryview)) else source)
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
    except FileNotFoundError as error:
        raise CorruptImageError(f"image file {label} is missing") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot decode image {label}: {error}") from error
    return image


_local = threading.local()  # a ZstdDecompressor must not be used by two threads at once


def _parse_npy(raw) -> np.ndarray:
    """An NPY stream as a (read-only) array view on ``raw``: no copy, unlike ``np.load``."""
    stream = io.BytesIO(raw[:4096] if len(raw) > 4096 else raw)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported NPY version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not label maps")
    count = int(np.prod(shape)) if shape else 1
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def decode_labels(source: str | os.PathLike | bytes | memoryview, name: str | os.PathLike | None = None) -> np.ndarray:
    """Label maps [S, H, W] from a mask file (path) or its bytes, same results and errors as
    ``rmae.masks.load_labels`` without its two copies (decompress straight into the array's buffer).

    ``name`` names the file in errors and, for bytes, decides the format (``.npy.zst`` ours, ``.npy`` the
    original's). FileNotFoundError for a missing file, MaskError for an unreadable one. The array may be
    read-only.
    """
    if name is None:
        name = source
    try:
        raw = source if isinstance(source, (bytes, memoryview)) else Path(source).read_bytes()
        if str(name).endswith(MASK_SUFFIX):
            decompressor = getattr(_local, "zstd", None)
            if decompressor is None:
                decompressor = _local.zstd = zstandard.ZstdDecompressor()
            raw = decompressor.decompress(raw)
        labels = _parse_npy(raw)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise MaskError(f"cannot read mask file {name}: {error}") from error
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise MaskError(f"mask file {name} holds {labels.dtype} {labels.shape}, expected integer labels [S, H, W]")
    return labels
