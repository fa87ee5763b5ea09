"""Image decoding shared by preprocessing and the data pipeline: any file Pillow reads → RGB.

Every 8-bit mode (L, LA, P, RGBA, CMYK, YCbCr, ...) goes through Pillow's ``convert("RGB")``, as the
original R-MAE code does, so FH masks are computed on exactly the pixels the model is trained on.
16-bit, 32-bit and float grayscale images (modes I;16, I, F) are first scaled to 8 bits: ``convert("RGB")``
clips them at 255, which turns a 16-bit photo white (the original's behaviour, not copied). The scale
follows the declared bit depth, not the content: 16-bit values v map to round(v * 255 / 65535); 32-bit
integer and float images map their own range [min, max] to [0, 255], float images within [0, 1] are
multiplied by 255.
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
    """An image file that cannot be decoded: carries the path and the reason, and whether the file's content is at
    fault (corrupt, truncated, not an image: ``content``) rather than the file system (missing, I/O error)."""

    def __init__(self, path: str | os.PathLike, reason: str, content: bool = True):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.content = content


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
        if image.mode == "RGB":
            return image
        rgb = to_8bit(image).convert("RGB")
        if is_wide(image.mode):
            rgb.info["rmae_wide"] = image.mode  # decoded otherwise before DECODE_VERSION 2 (rmae.masks)
        return rgb
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(label, "file not found", content=False) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(label, "not a recognised image format (corrupt or not an image)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        file_system = isinstance(error, OSError) and error.errno is not None  # EIO, EACCES, EMFILE, ...
        raise ImageDecodeError(label, f"cannot decode ({error})", content=not file_system) from None


def is_wide(mode: str) -> bool:
    """Whether a Pillow mode holds more than 8 bits per sample (I;16*, I, F): scaled by ``to_8bit``."""
    return mode in ("I", "F") or mode.startswith("I;16")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grayscale image as 8-bit ``L`` (see the module notes); other modes as they are."""
    if not is_wide(image.mode):
        return image
    values = np.asarray(image)
    if _bits(image) == 16:
        values = np.clip(values.astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    scaled = (values - lo) * (255 / (hi - lo)) if hi > lo else np.clip(values, 0, 255)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _bits(image: Image.Image) -> int:
    """The declared bits per sample of an ``I;16*`` / ``I`` / ``F`` image: Pillow opens 16-bit PNG, PGM and PPM
    (any maxval, rescaled to 65535) as ``I;16`` or ``I``, and TIFF says it in its BitsPerSample tag."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM")):
        return 16
    if image.mode == "I" and image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258, (32,))
        return 16 if (bits[0] if isinstance(bits, tuple) else bits) <= 16 else 32
    return 32


def load_rgb(source: str | os.PathLike | bytes | memoryview, name: str | os.PathLike | None = None) -> np.ndarray:
    """``open_rgb`` as a C-contiguous uint8 array [H, W, 3]."""
    return np.ascontiguousarray(np.asarray(open_rgb(source, name), dtype=np.uint8))
