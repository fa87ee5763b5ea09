"""Image and mask decoding, from a path or from bytes held in memory (the shard cache).

Images: Pillow, full decode (no ``Image.draft``: DCT-domain downscaling does not equal a full decode
followed by the bicubic resize), then ``.convert("RGB")`` as the original code does for every mode
(L, LA, P, RGBA, CMYK, I;16, ...).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import zstandard
from PIL import Image

from rmae.masks import MASK_SUFFIX, MaskError, load_labels

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


_decompressor: zstandard.ZstdDecompressor | None = None


def decode_labels(source: str | os.PathLike | bytes | memoryview, name: str | os.PathLike) -> np.ndarray:
    """Label maps [S, H, W] from a mask file path (``rmae.masks.load_labels``) or from its bytes.

    ``name`` (the file's path) decides the format (``.npy.zst`` ours, ``.npy`` the original's) and names the
    file in errors. FileNotFoundError for a missing file, MaskError for an unreadable one.
    """
    if not isinstance(source, (bytes, memoryview)):
        return load_labels(source)
    global _decompressor
    try:
        raw = source
        if str(name).endswith(MASK_SUFFIX):
            if _decompressor is None:
                _decompressor = zstandard.ZstdDecompressor()
            raw = _decompressor.decompress(raw)
        labels = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as error:
        raise MaskError(f"cannot read mask file {name}: {error}") from error
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise MaskError(f"mask file {name} holds {labels.dtype} {labels.shape}, expected integer labels [S, H, W]")
    return labels
