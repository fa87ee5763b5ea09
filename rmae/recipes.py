"""The official FH recipes (R-MAE) and the datasets root: shared by preprocessing and the data pipeline."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FHRecipe", "COCO_FH", "IMAGENET_FH", "dataset_name", "dataset_root", "folder_command", "recipe_folder"]


def dataset_name(name):
    """The commands' and configs' name of a dataset: ``imagenet`` (the data API's name) is ``imnet``; any other
    value as it is."""
    return "imnet" if name == "imagenet" else name


def dataset_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$E2E_DATASETS``, else ``.data``."""
    return Path(root if root is not None else os.environ.get("E2E_DATASETS", ".data"))


@dataclass(frozen=True)
class FHRecipe:
    """FH parameters: one label map per scale, computed on the full-resolution image."""

    scales: tuple[float, ...]
    min_sizes: tuple[int, ...]
    sigma: float = 0.8

    def describe(self) -> str:
        """``scales 500,1000,1500, min sizes 500,1000,1500, sigma 0.8``: for messages."""
        return (f"scales {','.join(f'{s:g}' for s in self.scales)}, min sizes "
                f"{','.join(str(m) for m in self.min_sizes)}, sigma {self.sigma:g}")


COCO_FH = FHRecipe((500.0, 1000.0, 1500.0), (500, 1000, 1500))  # min_size equals the scale
IMAGENET_FH = FHRecipe((1000.0,), (1000,))


def recipe_folder(mask_dir: Path, recipe: FHRecipe) -> Path:
    """Where the masks of ``recipe`` go when ``mask_dir`` holds another recipe's: beside it, named by the scales
    (``fh_train2017_500-1000-1500``)."""
    return mask_dir.with_name(f"{mask_dir.name}_{'-'.join(f'{s:g}' for s in recipe.scales)}")


def folder_command(images: str | os.PathLike, masks: str | os.PathLike, recipe: FHRecipe) -> str:
    """The preprocessing command (generic mode) that writes the masks of ``images`` into ``masks``."""
    command = f"python -m rmae.preprocess --images {shlex.quote(str(images))} --out {shlex.quote(str(masks))}"
    if (recipe.scales, recipe.min_sizes) != (COCO_FH.scales, COCO_FH.min_sizes):  # generic mode's default recipe
        command += (f" --scales {','.join(f'{s:g}' for s in recipe.scales)}"
                    f" --min-sizes {','.join(str(m) for m in recipe.min_sizes)}")
    if recipe.sigma != COCO_FH.sigma:
        command += f" --sigma {recipe.sigma:g}"
    return command
