"""Image and mask decoding for the loader, from a path or from bytes held in memory (the shard cache).

Both are the project's single implementations: images through ``rmae.image_io.open_rgb`` (the same
decoding the FH preprocessing uses), masks through ``rmae.masks.load_labels`` (zero-copy).
"""
from __future__ import annotations

from rmae.image_io import ImageDecodeError as CorruptImageError
from rmae.image_io import open_rgb as decode_image
from rmae.masks import load_labels as decode_labels

__all__ = ["CorruptImageError", "decode_image", "decode_labels"]
