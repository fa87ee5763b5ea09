"""Image lists: which files a dataset holds, where their FH masks live, and its FH recipe.

Paths are kept as one numpy bytes array (no per-item Python objects), so DataLoader workers forked from
the main process share the list without copying it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rmae.recipes import COCO_FH, IMAGENET_FH, FHRecipe

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetNotFoundError",
    "FHRecipe",
    "ImageList",
    "dataset_root",
    "coco",
    "imagenet",
    "sample",
    "open_image_list",
    "read_coco_file_names",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
COCO_SPLITS = ("train2017", "val2017", "unlabeled2017")
COCO_UNION = {"coco++": ("train2017", "unlabeled2017")}
IMAGENET_SPLITS = ("train", "val")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder that is missing or empty; the message shows the expected tree and how to prepare it."""





@dataclass
class ImageList:
    """A list of images under one or more (image folder, mask folder) roots."""

    name: str
    roots: list[tuple[Path, Path]]  # (image_dir, mask_dir)
    paths: np.ndarray  # bytes 'S' [N]: image path relative to its root's image_dir, utf-8
    root_ids: np.ndarray  # uint8 [N]
    recipe: FHRecipe
    preprocess_hint: str = ""
    layout: str = ""  # the expected tree, for error messages
    arrays: list[np.ndarray] | None = None  # in-memory RGB images (the bundled sample set)
    labels: list[np.ndarray] | None = field(default=None, repr=False)  # in-memory FH labels (sample set)

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def relative(self, index: int) -> str:
        return self.paths[index].decode("utf-8")

    def image_file(self, index: int) -> Path:
        return self.roots[self.root_ids[index]][0] / self.relative(index)

    def mask_dir(self, index: int) -> Path:
        return self.roots[self.root_ids[index]][1]


def dataset_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$E2E_DATASETS``, else ``.data``."""
    return Path(root if root is not None else os.environ.get("E2E_DATASETS", ".data"))


def missing_masks_message(images: "ImageList", mask_dir: Path) -> str:
    """Explains a missing mask folder: the expected tree, the preprocessing command and the alternatives."""
    return (
        f"{images.name}: mask folder {mask_dir} not found (regions='offline' reads FH masks).\n"
        f"Expected layout:\n{images.layout}\nMake the masks with:\n    {images.preprocess_hint}\n"
        "or compute regions in the loader with regions='online' (FH on the full image) or 'online_crop'."
    )


def _tree_message(root: Path, what: str, tree: str, command: str) -> str:
    return (
        f"{what}\nExpected under {root.resolve()} (set $E2E_DATASETS or root= to change it):\n{tree}\n"
        f"FH masks are made with:\n    {command}\n"
        "(offline masks are only needed with regions='offline'; 'online', 'online_crop' and 'none' read images only)"
    )


def _pack(paths: Sequence[str]) -> np.ndarray:
    encoded = [p.encode("utf-8") for p in paths]
    return np.array(encoded, dtype=f"S{max((len(p) for p in encoded), default=1)}")


def read_coco_file_names(annotation_file: str | os.PathLike) -> list[str]:
    """``images[].file_name`` of a COCO annotation file, sorted by image id (the original's order).

    Only the ``images`` array is decoded (``raw_decode`` from its opening bracket), so the 450 MB
    instances_train2017.json is read in about a second instead of a full ``json.load``.
    """
    text = Path(annotation_file).read_text(encoding="utf-8")
    images = None
    match = re.search(r'"images"\s*:\s*\[', text)
    if match is not None:
        try:
            images, _ = json.JSONDecoder().raw_decode(text, match.end() - 1)
        except ValueError:
            images = None
    if not isinstance(images, list):
        try:
            images = json.loads(text)["images"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{annotation_file}: no COCO 'images' list ({error})") from error
    entries = []
    for position, image in enumerate(images):
        if not isinstance(image, dict) or "file_name" not in image:
            raise ValueError(f"{annotation_file}: images[{position}] has no file_name")
        entries.append((image.get("id", position), position, image["file_name"]))
    entries.sort(key=lambda e: (e[0], e[1]) if isinstance(e[0], int) else (float("inf"), e[1]))
    return [e[2] for e in entries]


def _walk(folder: Path, sub: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder / sub if sub else folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(name if rel == "." else os.path.join(rel, name))
    return found


def _list_images(folder: Path, num_threads: int = 16) -> list[str]:
    """Image files under ``folder`` (recursively), relative, sorted. Subfolders (ImageNet's 1000 classes) are
    listed on ``num_threads`` threads: on network file systems listing is latency-bound."""
    with os.scandir(folder) as entries:
        entries = list(entries)
    found = [e.name for e in entries
             if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")]
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if subdirs:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(num_threads, len(subdirs)))) as pool:
            for part in pool.map(lambda sub: _walk(folder, sub), subdirs):
                found.extend(part)
    found.sort()
    return found


COCO_TREE = """\
    coco/annotations/instances_train2017.json, instances_val2017.json, image_info_unlabeled2017.json
        (optional: without them the image folder is listed)
    coco/image/train2017/*.jpg   coco/image/val2017/*.jpg   coco/image/unlabeled2017/*.jpg
    coco/image/fh_train2017/<stem>.npy.zst   (masks, for regions='offline')"""

IMAGENET_TREE = """\
    imagenet/train/<class>/<image>.JPEG   imagenet/val/<class>/<image>.JPEG   ('imnet/' is accepted too)
    imagenet/fh_train/<class>/<stem>.npy.zst   (masks, for regions='offline')"""


def coco(split: str = "train2017", root: str | os.PathLike | None = None) -> ImageList:
    """COCO ``train2017``, ``val2017``, ``unlabeled2017`` or ``coco++`` (train2017 + unlabeled2017)."""
    base = dataset_root(root)
    parts = COCO_UNION.get(split, (split,))
    for part in parts:
        if part not in COCO_SPLITS:
            raise ValueError(f"unknown COCO split {split!r}; expected one of {COCO_SPLITS + tuple(COCO_UNION)}")
    roots, all_paths, all_ids = [], [], []
    hint = " && ".join(f"python -m rmae.preprocess --dataset coco --split {p}" for p in parts)
    for part in parts:
        image_dir = base / "coco" / "image" / part
        mask_dir = base / "coco" / "image" / f"fh_{part}"
        if not image_dir.is_dir():
            raise DatasetNotFoundError(
                _tree_message(base, f"COCO {part}: image folder {image_dir} not found.", COCO_TREE, hint)
            )
        annotation = base / "coco" / "annotations" / (
            "image_info_unlabeled2017.json" if part == "unlabeled2017" else f"instances_{part}.json"
        )
        names = read_coco_file_names(annotation) if annotation.is_file() else _list_images(image_dir)
        if not names:
            raise DatasetNotFoundError(_tree_message(base, f"COCO {part}: no images in {image_dir}.", COCO_TREE, hint))
        all_ids.append(np.full(len(names), len(roots), dtype=np.uint8))
        roots.append((image_dir, mask_dir))
        all_paths.extend(names)
    return ImageList(f"coco/{split}", roots, _pack(all_paths), np.concatenate(all_ids), COCO_FH, hint, COCO_TREE)


def imagenet(split: str = "train", root: str | os.PathLike | None = None) -> ImageList:
    """ImageNet ``train`` or ``val`` in class folders, under ``imagenet/`` or ``imnet/``."""
    if split not in IMAGENET_SPLITS:
        raise ValueError(f"unknown ImageNet split {split!r}; expected one of {IMAGENET_SPLITS}")
    base = dataset_root(root)
    hint = f"python -m rmae.preprocess --dataset imnet --split {split}"
    for folder in ("imagenet", "imnet"):
        image_dir = base / folder / split
        if image_dir.is_dir():
            break
    else:
        raise DatasetNotFoundError(
            _tree_message(base, f"ImageNet {split}: neither {base / 'imagenet' / split} nor "
                          f"{base / 'imnet' / split} exists.", IMAGENET_TREE, hint)
        )
    names = _list_images(image_dir)
    if not names:
        raise DatasetNotFoundError(
            _tree_message(base, f"ImageNet {split}: no images in {image_dir}.", IMAGENET_TREE, hint))
    mask_dir = image_dir.parent / f"fh_{split}"
    return ImageList(f"imagenet/{split}", [(image_dir, mask_dir)], _pack(names), np.zeros(len(names), np.uint8),
                     IMAGENET_FH, hint, IMAGENET_TREE)


# Colour photographs bundled with scikit-image (no download). ``logo`` is RGBA → RGB as PIL converts it.
SAMPLE_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
    "retina", "colorwheel", "logo", "stereo_motorcycle:0", "stereo_motorcycle:1",
)


SAMPLE_MAX_SIDE = 640  # COCO-sized, so the COCO FH recipe (min_size in pixels) means the same


def _load_sample_image(spec: str, max_side: int | None = None) -> np.ndarray:
    import skimage.data
    from PIL import Image

    name, _, part = spec.partition(":")
    image = getattr(skimage.data, name)()
    if part:
        image = image[int(part)]
    image = Image.fromarray(image).convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    return np.asarray(image)


def sample(split: str = "train", root=None) -> ImageList:
    """The 11 colour photos bundled with scikit-image (longer side at most 640 px), held in memory: the
    no-download demo and test set."""
    arrays = [_load_sample_image(spec, SAMPLE_MAX_SIDE) for spec in SAMPLE_IMAGES]
    names = [spec.replace(":", "_") for spec in SAMPLE_IMAGES]
    return ImageList("sample", [(Path("<skimage.data>"), Path("<memory>"))], _pack(names),
                     np.zeros(len(names), np.uint8), COCO_FH, "", arrays=arrays)


_DATASETS = {"coco": coco, "imagenet": imagenet, "imnet": imagenet, "sample": sample}
DEFAULT_SPLITS = {"coco": "train2017", "imagenet": "train", "imnet": "train", "sample": "train"}


def open_image_list(dataset: str, split: str | None = None, root: str | os.PathLike | None = None) -> ImageList:
    """``dataset`` ∈ {coco, imagenet, imnet, sample}; ``coco++`` is accepted as a dataset name too."""
    if dataset == "coco++":
        dataset, split = "coco", "coco++"
    if dataset not in _DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_DATASETS) + ['coco++']}")
    return _DATASETS[dataset](split or DEFAULT_SPLITS[dataset], root)
