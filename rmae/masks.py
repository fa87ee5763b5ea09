"""FH mask files: ours (zstd-compressed uint16 .npy) and the original's (uint8 .npy).

Ours: ``<stem>.npy.zst`` holds a standard NPY stream of uint16 labels [S, H, W] compressed with
Zstandard — lossless, no wrap below 65536 segments, about 1 ms to read a 640×480×3 file.
The original R-MAE code stores ``<stem>.npy`` uint8 [S, H, W] (labels >= 256 wrapped); both load.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import threading
from pathlib import Path

import numpy as np
import zstandard

from rmae.recipes import FHRecipe

__all__ = ["MASK_SUFFIX", "PARAMS_FILE", "DECODE_VERSION", "ORIGINAL_SUFFIX", "save_labels", "load_labels", "mask_path",
           "find_mask", "folder_params", "recorded_recipe", "MaskError", "REDO_KEY"]

MASK_SUFFIX = ".npy.zst"
PARAMS_FILE = "fh_params.json"  # a mask folder's recipe, written by rmae.preprocess
REDO_KEY = "redo_started_ns"  # in PARAMS_FILE while an --overwrite run (or its resumption) is unfinished
# How images became pixels (rmae.image_io), recorded as "decode" in PARAMS_FILE: 2 scales 16-bit, 32-bit and float
# images to 8 bits; 1 (folders without the key, and the original's) clipped them to white before FH.
DECODE_VERSION = 2
ORIGINAL_SUFFIX = ".npy"
MAX_LABEL = np.iinfo(np.uint16).max
_ZSTD_LEVEL = 3


class MaskError(ValueError):
    """A mask file that cannot be read or does not hold label maps (or, raised by the dataset, whose maps do not fit
    their image or the recipe: training replaces such a sample and counts it)."""


def folder_params(mask_dir: str | os.PathLike) -> dict:
    """What a mask folder's ``PARAMS_FILE`` records (recipe, decoding, an unfinished redo); {} without a readable
    record (the original's masks, a folder not made by rmae.preprocess)."""
    try:
        params = json.loads((Path(mask_dir) / PARAMS_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def recorded_recipe(params: dict) -> FHRecipe | None:
    """The ``FHRecipe`` in a mask folder's ``folder_params``; None when they hold none."""
    try:
        return FHRecipe(tuple(float(s) for s in params["scales"]), tuple(int(m) for m in params["min_sizes"]),
                        float(params["sigma"]))
    except (ValueError, KeyError, TypeError):
        return None


def mask_path(mask_dir: str | os.PathLike, relative_image_path: str | os.PathLike) -> Path:
    """Where our mask for an image lives: the image's relative path with its suffix replaced."""
    return Path(mask_dir) / Path(relative_image_path).with_suffix(MASK_SUFFIX)


def shared_mask_names(relative_image_paths) -> dict[Path, list]:
    """The mask file names (``mask_path("", relative)``) that several of the given image paths map to, each with
    those paths in their order (``x.jpg`` and ``x.png``: ``x.npy.zst``): no mask can tell such images apart."""
    by_mask: dict[Path, list] = {}
    for relative in relative_image_paths:
        by_mask.setdefault(mask_path("", relative), []).append(relative)
    return {mask: group for mask, group in by_mask.items() if len(group) > 1}


def find_mask(mask_dir: str | os.PathLike, relative_image_path: str | os.PathLike) -> Path | None:
    """Our mask file if present, else the original's ``.npy``, else None."""
    ours = mask_path(mask_dir, relative_image_path)
    if ours.is_file():
        return ours
    original = Path(mask_dir) / Path(relative_image_path).with_suffix(ORIGINAL_SUFFIX)
    return original if original.is_file() else None


def _create_temp(folder: Path) -> tuple[int, Path]:
    """A new hidden temp file in ``folder``, open for writing: (fd, path).

    The name is short (25 bytes), so it fits wherever the final mask name fits. The kernel gives the
    file mode 0666 less the process umask, like any new file; the umask is never read or changed.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f".{secrets.token_hex(6)}{MASK_SUFFIX}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name in {folder} after 100 tries")


def save_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Writes labels [S, H, W] (or [H, W]) atomically as uint16; raises ValueError beyond 65536 segments (a label above 65535)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3:
        raise ValueError(f"labels must be [S, H, W] or [H, W], got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0 (FH numbers segments 0..n-1), got {labels.min()}")
    if labels.size and labels.max() > MAX_LABEL:
        raise ValueError(
            f"labels span {labels.min()}..{labels.max()}: uint16 masks hold at most {MAX_LABEL + 1} segments "
            "(raise the FH scale or min_size)"
        )
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(labels, dtype=np.uint16))
    payload = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).compress(buffer.getvalue())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_local = threading.local()  # a ZstdDecompressor must not be used by two threads at once
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


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


def load_labels(source: str | os.PathLike | bytes | memoryview, name: str | os.PathLike | None = None,
                max_bytes: int | None = None) -> np.ndarray:
    """Labels [S, H, W] from our ``.npy.zst`` (uint16) or the original's ``.npy`` (uint8) file.

    ``source`` is a path, or the file's bytes (e.g. from an in-memory cache) with ``name`` naming the
    file in messages; the Zstandard magic number tells ours from an NPY stream. Zstandard decompresses
    straight into the array's buffer, so the result may be read-only. Raises FileNotFoundError for a
    missing file and MaskError for an unreadable (or empty) one, or for one whose contents exceed
    ``max_bytes`` (when given: a foreign file that would decompress to gigabytes is refused unread).
    """
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    if name is None:
        name = f"<{len(source)} bytes>" if in_memory else source
    try:
        raw = source if in_memory else Path(source).read_bytes()
        if len(raw) == 0:
            raise MaskError(f"mask file {name} is empty (0 bytes); rmae.preprocess --verify makes it again")
        if bytes(raw[:4]) == _ZSTD_MAGIC:  # ours (whatever the case of the suffix); else an NPY stream
            decompressor = getattr(_local, "zstd", None)
            if decompressor is None:
                decompressor = _local.zstd = zstandard.ZstdDecompressor()
            size = zstandard.frame_content_size(raw) if max_bytes is not None else None
            if size is not None and size > max_bytes:
                raise _too_large(name, max_bytes)
            if size is not None and size < 0:  # not recorded (`zstd` writing to a pipe): read no further than that
                with decompressor.stream_reader(raw) as reader:
                    raw = reader.read(max_bytes + 1)
                if len(raw) > max_bytes:
                    raise _too_large(name, max_bytes)
            else:
                try:
                    raw = decompressor.decompress(raw)
                except zstandard.ZstdError as error:  # a frame without its content size (`zstd` writing to a pipe)
                    if "content size" not in str(error):
                        raise
                    raw = decompressor.decompressobj().decompress(raw)
        elif max_bytes is not None and len(raw) > max_bytes:
            raise _too_large(name, max_bytes)
        labels = _parse_npy(raw)
    except (FileNotFoundError, MaskError):
        raise
    except Exception as error:  # truncated zstd frame, bad NPY header, ...
        raise MaskError(f"cannot read mask file {name}: {error}") from error
    return _as_labels(labels, name)


def _too_large(name, max_bytes: int) -> MaskError:
    return MaskError(f"mask file {name} holds more than {max_bytes} bytes, more than a mask of its image")


def _as_labels(labels: np.ndarray, name) -> np.ndarray:
    """Checks parsed NPY contents as label maps: [S, H, W] ([H, W] taken as one scale), integers, native order."""
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3 or labels.dtype.kind not in "iu":
        raise MaskError(f"mask file {name} holds {labels.dtype} {labels.shape}, expected integer labels [S, H, W]")
    if not labels.dtype.isnative:  # a big-endian file (written elsewhere): the compiled label code reads native order
        labels = labels.astype(labels.dtype.newbyteorder("="))
    return labels
