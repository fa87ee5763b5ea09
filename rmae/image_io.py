"""Image decoding shared by preprocessing and the data pipeline: any file Pillow reads → RGB.

Every mode (L, LA, P, RGBA, CMYK, YCbCr, I;16, ...) goes through Pillow's ``convert("RGB")``, as the
original R-MAE code does, so FH masks are computed on exactly the pixels the model is trained on.
The whole file is decoded eagerly (no ``Image.draft``: DCT-domain downscaling differs from a full
decode followed by the resize), so a truncated or corrupt file raises here, not later.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageDecodeError", "open_rgb", "load_rgb", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}


class ImageDecodeError(OSError):
    """An image file that cannot be decoded: carries the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def open_rgb(source: str | os.PathLike | bytes | memoryview, name: str | os.PathLike | None = None) -> Image.Image:
    """A fully decoded RGB PIL image from a file path or encoded bytes.

    Raises ImageDecodeError (naming the path, or ``name`` for bytes) for missing, unreadable,
    corrupt, truncated or empty images.
    """
    in_memory = isinstance(source, (bytes, memoryview))
    label = name if name is not None else ("<bytes>" if in_memory else source)
    try:
        image = Image.open(io.BytesIO(source) if in_memory else Path(source))
        image.load()
        if image.width == 0 or image.height == 0:
            raise ImageDecodeError(label, "image has zero size")
        return image if image.mode == "RGB" else image.convert("RGB")
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(label, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(label, "not a recognised image format (corrupt or not an image)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(label, f"cannot decode ({error})") from None


def load_rgb(source: str | os.PathLike | bytes | memoryview, name: str | os.PathLike | None = None) -> np.ndarray:
    """``open_rgb`` as a C-contiguous uint8 array [H, W, 3]."""
    return np.ascontiguousarray(np.asarray(open_rgb(source, name), dtype=np.uint8))
