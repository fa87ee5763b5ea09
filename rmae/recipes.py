"""The official FH recipes (R-MAE): shared by preprocessing and the data pipeline."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FHRecipe", "COCO_FH", "IMAGENET_FH"]


@dataclass(frozen=True)
class FHRecipe:
    """FH parameters: one label map per scale, computed on the full-resolution image."""

    scales: tuple[float, ...]
    min_sizes: tuple[int, ...]
    sigma: float = 0.8


COCO_FH = FHRecipe((500.0, 1000.0, 1500.0), (500, 1000, 1500))  # min_size equals the scale
IMAGENET_FH = FHRecipe((1000.0,), (1000,))
