"""Image lists: which files a dataset holds, where their FH masks live, and its FH recipe.

Paths are kept as one numpy bytes array (no per-item Python objects), so DataLoader workers forked from
the main process share the list without copying it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rmae import listing
from rmae.image_io import IMAGE_SUFFIXES
from rmae.recipes import COCO_FH, IMAGENET_FH, FHRecipe, dataset_root, folder_command

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetNotFoundError",
    "FHRecipe",
    "ImageList",
    "dataset_root",
    "coco",
    "imagenet",
    "sample",
    "open_folders",
    "open_image_list",
    "read_coco_file_names",
]

IMAGE_EXTENSIONS = tuple(sorted(IMAGE_SUFFIXES))  # the files preprocessing segments, no more, no fewer
COCO_SPLITS = ("train2017", "val2017", "unlabeled2017")
COCO_UNION = {"coco++": ("train2017", "unlabeled2017")}
IMAGENET_SPLITS = ("train", "val")
IMAGENET_DIRS = ("imagenet", "imnet")  # relative ImageNet folders are looked for under each, in this order


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder that is missing or empty; the message shows the expected tree and how to prepare it."""


class MissingImageError(FileNotFoundError):
    """Images the annotation file lists but the image folder lacks (an incomplete download or extraction):
    an error, not corrupt samples to replace, since every missing image would silently become another one."""





@dataclass
class ImageList:
    """A list of images under one or more (image folder, mask folder) roots."""

    name: str
    roots: list[tuple[Path, Path]]  # (image_dir, mask_dir)
    paths: np.ndarray  # bytes 'S' [N]: image path relative to its root's image_dir (os.fsencode)
    root_ids: np.ndarray  # uint8 [N]
    recipe: FHRecipe
    preprocess_hint: str = ""
    layout: str = ""  # the expected tree, for error messages
    arrays: list[np.ndarray] | None = None  # in-memory RGB images (the bundled sample set)
    labels: list[np.ndarray] | None = field(default=None, repr=False)  # FH labels of ``arrays`` made with ``recipe``
    commands: list[str] = field(default_factory=list)  # per root: the preprocessing command that writes its masks

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def relative(self, index: int) -> str:
        return os.fsdecode(self.paths[index])

    def image_file(self, index: int) -> Path:
        return self.roots[self.root_ids[index]][0] / self.relative(index)

    def mask_dir(self, index: int) -> Path:
        return self.roots[self.root_ids[index]][1]

    def command(self, index: int) -> str:
        """The preprocessing command that writes the mask of image ``index``."""
        return self.root_command(self.root_ids[index])

    def root_command(self, root: int, recipe: FHRecipe | None = None) -> str:
        """The preprocessing command that writes the masks of image folder ``root`` with ``recipe`` (default: the
        list's): by dataset and split for a standard folder and the list's recipe, else by folder."""
        if self.commands and (recipe is None or recipe == self.recipe):
            return self.commands[root]
        image_dir, mask_dir = self.roots[root]
        return folder_command(image_dir, mask_dir, recipe or self.recipe)


def missing_masks_message(images: "ImageList", missing: Sequence[int]) -> str:
    """Explains missing mask folders (``missing``: indices into ``images.roots``): the commands that write them
    (with the expected tree when one is a standard folder of the dataset's layout) and the alternatives."""
    folders = ", ".join(str(images.roots[i][1]) for i in missing)
    commands = [images.root_command(i) for i in missing]
    text = (f"{images.name}: mask folder{'s' if len(missing) > 1 else ''} {folders} not found "
            "(regions='offline' reads FH masks).\n")
    if any("--dataset" in c for c in commands):
        text += f"Expected layout:\n{images.layout}\n"
    for i, c in zip(missing, commands):
        if "--dataset" not in c:  # a folder of the user's own
            image_dir, mask_dir = images.roots[i]
            beside = "" if mask_dir == default_mask_dir(image_dir) else f"; null: {default_mask_dir(image_dir)}"
            text += (f"{mask_dir} should hold the masks of image folder {image_dir} (mask_folder names another "
                     f"folder{beside}).\n")
    return (text + "Make the masks with:\n    " + " && ".join(commands) + "\n"
            "or compute regions in the loader with regions='online' (FH on the full image) or 'online_crop'.")


def _tree_message(root: Path, what: str, tree: str, command: str) -> str:
    return (
        f"{what}\nExpected under {root.resolve()} (set $E2E_DATASETS or root= to change it):\n{tree}\n"
        f"FH masks are made with:\n    {command}\n"
        "(offline masks are only needed with regions='offline'; 'online', 'online_crop' and 'none' read images only)"
    )


def _pack(paths: Sequence[str]) -> np.ndarray:
    encoded = [os.fsencode(p) for p in paths]  # also names that are not valid UTF-8 (surrogate escapes)
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


def _list_images(folder: Path, num_threads: int = 16) -> list[str]:
    """Image files under ``folder`` (recursively, symlinked folders followed), relative, sorted: the images
    preprocessing segments (``rmae.listing``). Broken links are left out; folders that cannot be listed are
    reported, not silently dropped."""
    scan = listing.scan_images(folder, num_threads)
    if scan.unlistable:
        shown = "; ".join(f"{folder / p}: {why}" for p, why in scan.unlistable[:5])
        more = f" (and {len(scan.unlistable) - 5} more)" if len(scan.unlistable) > 5 else ""
        warnings.warn(f"{len(scan.unlistable)} folder(s) under {folder} cannot be listed; their images are "
                      f"left out: {shown}{more}", stacklevel=2)
    return scan.images


COCO_TREE = """\
    coco/annotations/instances_train2017.json, instances_val2017.json, image_info_unlabeled2017.json
        (optional: without them the image folder is listed)
    coco/image/train2017/*.jpg   coco/image/val2017/*.jpg   coco/image/unlabeled2017/*.jpg
    coco/image/fh_train2017/<stem>.npy.zst   (masks, for regions='offline')"""

IMAGENET_TREE = """\
    imagenet/train/<class>/<image>.JPEG   imagenet/val/<class>/<image>.JPEG   ('imnet/' is accepted too)
    imagenet/fh_train/<class>/<stem>.npy.zst   (masks, for regions='offline')"""


@dataclass(frozen=True)
class Folder:
    """One image folder of a dataset: where its images, FH masks and (optional) annotation file are."""

    label: str  # for messages: "COCO train2017", "ImageNet train"
    images: Path
    masks: Path
    annotations: Path | None = None  # a COCO-style json listing the images; None: the folder is listed
    annotations_optional: bool = False  # a missing file means "list the folder" (the standard COCO files)
    searched: tuple[Path, ...] = ()  # where the image folder was looked for, when in more than one place
    command: str = ""  # the preprocessing command that writes ``masks``
    relative: bool = False  # a relative image folder other than a standard split's (taken under the dataset's folder)


def _under(base: Path, path: str | os.PathLike) -> Path:
    """``path`` as it is when absolute, else relative to ``base``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def default_mask_dir(image_dir: Path) -> Path:
    """``fh_<name>`` beside the image folder ``<name>``: where preprocessing writes its masks."""
    return image_dir.parent / f"fh_{image_dir.name}"


def _coco_annotation(split: str) -> str:
    """The standard annotation file of a COCO split, relative to ``coco/``."""
    return "annotations/" + ("image_info_unlabeled2017.json" if split == "unlabeled2017" else f"instances_{split}.json")


def _standard_split(dataset: str, root: Path, images: Path, masks: Path) -> str | None:
    """The split whose standard folders (the README's dataset tree) ``images`` and ``masks`` are, else None."""
    if dataset == "coco":
        parents, splits = (root / "coco" / "image",), COCO_SPLITS
    else:
        parents, splits = tuple(root / d for d in IMAGENET_DIRS), IMAGENET_SPLITS
    standard = images.parent in parents and images.name in splits and masks == default_mask_dir(images)
    return images.name if standard else None


def _preprocess_command(dataset: str, root: Path, images: Path, masks: Path, recipe: FHRecipe) -> str:
    """The command that writes ``masks``: by dataset and split for a standard folder, else by folder."""
    split = _standard_split(dataset, root, images, masks)
    if split is not None:
        command = f"python -m rmae.preprocess --dataset {dataset} --split {split}"
        if Path(root).resolve() != dataset_root().resolve():
            command += f" --root {shlex.quote(str(root))}"  # data_dir= in the config, not the preprocessing default
        return command
    return folder_command(images, masks, recipe)


def _coco_folder(root: Path, image_folder, mask_folder=None, anno_file=None) -> Folder:
    """A COCO image folder; relative paths are under ``<root>/coco/``."""
    base = root / "coco"
    images = _under(base, image_folder)
    masks = default_mask_dir(images) if mask_folder is None else _under(base, mask_folder)
    annotations = None if anno_file is None else _under(base, anno_file)
    split = _standard_split("coco", root, images, default_mask_dir(images))
    optional = split is not None and annotations == base / _coco_annotation(split)
    return Folder(f"COCO {images.name}", images, masks, annotations, optional,
                  command=_preprocess_command("coco", root, images, masks, COCO_FH),
                  relative=split is None and not Path(image_folder).expanduser().is_absolute())


def _imagenet_folder(root: Path, image_folder, mask_folder=None, anno_file=None) -> Folder:
    """An ImageNet image folder; relative paths are under ``<root>/imagenet/``, or ``<root>/imnet/`` when that one
    holds the image folder (decided per folder); masks and annotations follow their image folder's choice."""
    bases = [root / d for d in IMAGENET_DIRS]
    if Path(image_folder).expanduser().is_absolute():
        bases = [next((b for b in bases if b.is_dir()), bases[0])]
    searched = tuple(_under(b, image_folder) for b in bases)
    base, images = next(((b, i) for b, i in zip(bases, searched) if i.is_dir()), (bases[0], searched[0]))
    masks = default_mask_dir(images) if mask_folder is None else _under(base, mask_folder)
    annotations = None if anno_file is None else _under(base, anno_file)
    standard = _standard_split("imnet", root, images, default_mask_dir(images)) is not None
    return Folder(f"ImageNet {image_folder}", images, masks, annotations, searched=searched,
                  command=_preprocess_command("imnet", root, images, masks, IMAGENET_FH),
                  relative=not standard and not Path(image_folder).expanduser().is_absolute())


def _folder_names(folder: Folder, root: Path, tree: str, hint: str) -> list[str]:
    """The folder's image paths, from its annotation file or its listing; a missing or empty folder is explained."""
    if not folder.images.is_dir():
        where = (f"neither {folder.searched[0]} nor {folder.searched[1]} exists." if len(folder.searched) > 1
                 else f"image folder {folder.images} not found.")
        if folder.relative:
            where += (" (a relative image folder is taken under the dataset's folder below the root; give an "
                      "absolute path for a folder elsewhere)")
        raise DatasetNotFoundError(_tree_message(root, f"{folder.label}: {where}", tree, hint))
    if folder.annotations is not None and folder.annotations.is_file():
        names = read_coco_file_names(folder.annotations)
        _check_listed_images(folder, names)
    elif folder.annotations is not None and not folder.annotations_optional:
        raise DatasetNotFoundError(
            f"{folder.label}: annotation file {folder.annotations} not found (anno_file: a COCO-style json whose "
            f"images[].file_name lists the images of {folder.images}; null lists the folder instead)")
    else:
        names = _list_images(folder.images)
    if not names:
        raise DatasetNotFoundError(_tree_message(root, f"{folder.label}: no images in {folder.images}.", tree, hint))
    return names


def _check_listed_images(folder: Folder, names: list[str]) -> None:
    """Every image the annotation file lists is in the folder (one listing of it; a name the listing lacks, e.g.
    of another suffix, is looked up itself): else MissingImageError before any sample is read, naming the files
    and the annotation file (a run stopped at the first missing image it drew, after hours on COCO)."""
    present = set(listing.scan_images(folder.images, 16).images)
    missing = [n for n in names if n not in present and not (folder.images / n).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingImageError(
            f"{folder.label}: {len(missing)} of the {len(names)} images that {folder.annotations} lists are not in "
            f"{folder.images}: {shown}. The folder is incomplete (a partial download or extraction?): restore "
            "them, or remove them from the annotation file.")


def _open(dataset: str, folders: list[Folder], recipe: FHRecipe, root: Path, tree: str) -> ImageList:
    """The images of ``folders`` in order, each with its own mask folder."""
    hint = " && ".join(f.command for f in folders)
    names = [_folder_names(f, root, tree, hint) for f in folders]
    root_ids = np.concatenate([np.full(len(n), i, dtype=np.uint8) for i, n in enumerate(names)])
    parts = tuple(f.images.name for f in folders)
    union = next((key for key, value in COCO_UNION.items() if value == parts), None) if dataset == "coco" else None
    return ImageList(f"{dataset}/{union or '+'.join(parts)}", [(f.images, f.masks) for f in folders],
                     _pack([p for n in names for p in n]), root_ids, recipe, hint, tree,
                     commands=[f.command for f in folders])


def _as_list(value) -> list:
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def _paired(key: str, values, count: int) -> list:
    """``values`` (the original's ``key``) as one entry per image folder; None: the default for each."""
    if values is None:
        return [None] * count
    values = _as_list(values)
    if len(values) != count:
        raise ValueError(f"{key} has {len(values)} entries ({values}) but image_folder has {count}: they pair up "
                         f"one to one (or leave {key} null for the defaults)")
    return values


def open_folders(dataset: str, image_folders, mask_folders=None, anno_files=None,
                 root: str | os.PathLike | None = None) -> ImageList:
    """The images of the given folders: the original's ``imdb_files`` (image_folder, mask_folder, anno_file).

    ``dataset`` ∈ {coco, imagenet, imnet}. Relative paths are under ``<root>/coco/``, or ``<root>/imagenet/`` (else
    ``imnet/``); absolute ones are used as they are. ``mask_folders`` and ``anno_files`` pair up with
    ``image_folders``; None: ``fh_<name>`` beside each image folder, and each folder's listing.
    """
    images = _as_list(image_folders)
    if not 0 < len(images) <= 256:
        raise ValueError(f"image_folder must name 1 to 256 folders, got {len(images)}")
    triples = list(zip(images, _paired("mask_folder", mask_folders, len(images)),
                       _paired("anno_file", anno_files, len(images))))
    base = dataset_root(root)
    if dataset == "coco":
        return _open("coco", [_coco_folder(base, *t) for t in triples], COCO_FH, base, COCO_TREE)
    if dataset in ("imagenet", "imnet"):
        return _open("imagenet", [_imagenet_folder(base, *t) for t in triples], IMAGENET_FH, base, IMAGENET_TREE)
    raise ValueError(f"image folders are read for coco, imagenet or imnet, not for dataset {dataset!r}")


def coco(split: str = "train2017", root: str | os.PathLike | None = None) -> ImageList:
    """COCO ``train2017``, ``val2017``, ``unlabeled2017`` or ``coco++`` (train2017 + unlabeled2017)."""
    parts = COCO_UNION.get(split, (split,))
    for part in parts:
        if part not in COCO_SPLITS:
            raise ValueError(f"unknown COCO split {split!r}; expected one of {COCO_SPLITS + tuple(COCO_UNION)}")
    return open_folders("coco", [f"image/{p}" for p in parts], [f"image/fh_{p}" for p in parts],
                        [_coco_annotation(p) for p in parts], root)


def imagenet(split: str = "train", root: str | os.PathLike | None = None) -> ImageList:
    """ImageNet ``train`` or ``val`` in class folders, under ``imagenet/`` or ``imnet/``."""
    if split not in IMAGENET_SPLITS:
        raise ValueError(f"unknown ImageNet split {split!r}; expected one of {IMAGENET_SPLITS}")
    return open_folders("imagenet", [split], root=root)


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
