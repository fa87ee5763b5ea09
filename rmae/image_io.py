"""Image decoding shared by preprocessing and the data pipeline: any file Pillow reads → RGB uint8.

Grayscale, palette, RGBA/LA (alpha dropped), CMYK and YCbCr convert through Pillow's ``convert("RGB")``
as the original R-MAE code does. 16-bit and 32-bit integer images are scaled to 8 bits first (Pillow's
own conversion would clip them to 255); float images are clipped to [0, 255]. The whole file is
decoded eagerly, so a truncated or corrupt file raises here, not later.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageDecodeError", "load_rgb", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded: carries the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        top = 65535 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        gray = np.clip(values * 255 // max(int(top), 1), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def load_rgb(source: str | os.PathLike | bytes, name: str | os.PathLike | None = None) -> np.ndarray:
    """Decodes a file path or encoded bytes to an RGB uint8 array [H, W, 3].

    Raises ImageDecodeError (with the path, or ``name`` for bytes) for missing, unreadable,
    corrupt, truncated or empty images.
    """
    label = name if name is not None else (source if not isinstance(source, bytes) else "<bytes>")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb")
        with handle, Image.open(handle) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                raise ImageDecodeError(label, "image has zero size")
            return _to_rgb(image)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(label, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(label, "not a recognised image format (corrupt or not an image)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(label, f"cannot decode ({error})") from None
