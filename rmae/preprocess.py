"""Precompute FH region masks: ``python -m rmae.preprocess``.

    python -m rmae.preprocess --dataset coco --split train2017      # also val2017, unlabeled2017
    python -m rmae.preprocess --dataset imnet --split train          # also val
    python -m rmae.preprocess --images DIR --out DIR [--scales 500,1000,1500]

Datasets live under ``$E2E_DATASETS`` (default ``.data``); masks go where the data pipeline reads
them (``coco/image/fh_<split>/<stem>.npy.zst``, ``imagenet/fh_<split>/<class>/<stem>.npy.zst``) with
the official recipes as defaults. Runs on all cores, shows a progress bar, skips finished files
(every write is atomic, so a killed run is simply started again), lists undecodable images in
``preprocess_failures.tsv`` and exits non-zero when there were any. ``--verify`` re-checks existing
masks and regenerates the bad ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from rmae import fh
from rmae.image_io import IMAGE_SUFFIXES, ImageDecodeError, load_rgb
from rmae.masks import MASK_SUFFIX, MaskError, load_labels, mask_path, save_labels
from rmae.recipes import COCO_FH, IMAGENET_FH, FHRecipe

__all__ = ["RECIPES", "dataset_folders", "list_images", "main", "preprocess"]

FAILURES_FILE = "preprocess_failures.tsv"
PARAMS_FILE = "fh_params.json"


RECIPES = {"coco": COCO_FH, "imnet": IMAGENET_FH}
SPLITS = {"coco": ("train2017", "val2017", "unlabeled2017"), "imnet": ("train", "val")}


def dataset_folders(dataset: str, split: str, root: Path) -> tuple[Path, Path]:
    """(image folder, mask folder) of a dataset split under ``root``, as DESIGN.md lays them out."""
    if split not in SPLITS[dataset]:
        raise SystemExit(f"error: --dataset {dataset} has splits {', '.join(SPLITS[dataset])}; got {split!r}")
    if dataset == "coco":
        images, masks = root / "coco" / "image" / split, root / "coco" / "image" / f"fh_{split}"
        layout = f"{root}/coco/image/{split}/<image>.jpg"
    else:
        base = root / "imagenet"
        if not base.is_dir() and (root / "imnet").is_dir():
            base = root / "imnet"
        images, masks = base / split, base / f"fh_{split}"
        layout = f"{root}/imagenet/{split}/<class>/<image>.JPEG   (or {root}/imnet/...)"
    if not images.is_dir():
        raise SystemExit(
            f"error: image folder {images} not found.\nExpected layout: {layout}\n"
            f"Set $E2E_DATASETS or --root to the folder that holds it."
        )
    return images, masks


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), as sorted paths relative to it."""
    return sorted(
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    )


def _check_mask(mask_file: Path, image_file: Path, recipe: FHRecipe) -> str | None:
    """Why an existing mask is bad, or None when it is sound."""
    try:
        labels = load_labels(mask_file)
    except (MaskError, OSError) as error:
        return str(error)
    try:
        with Image.open(image_file) as image:
            width, height = image.size
    except Exception as error:  # the image itself is broken: nothing to compare against
        return f"image unreadable ({error})"
    expected = (len(recipe.scales), height, width)
    if labels.shape != expected or labels.dtype != np.uint16:
        return f"holds {labels.dtype} {labels.shape}, expected uint16 {expected}"
    for scale_labels in labels:
        present = np.unique(scale_labels)
        if present[0] != 0 or present[-1] != len(present) - 1:
            return "labels are not numbered 0..n-1"
    return None


def _segment_one(image_file: Path, mask_file: Path, recipe: FHRecipe) -> None:
    image = load_rgb(image_file)
    labels = fh.felzenszwalb_multi(image, recipe.scales, recipe.sigma, recipe.min_sizes)
    save_labels(mask_file, labels)


def _check_params(out: Path, recipe: FHRecipe, overwrite: bool) -> None:
    """Refuses to mix recipes in one mask folder; records the recipe for later runs."""
    params_file = out / PARAMS_FILE
    wanted = {**asdict(recipe), "format": f"uint16 [S, H, W] {MASK_SUFFIX}"}
    wanted["scales"] = [float(s) for s in recipe.scales]
    wanted["min_sizes"] = [int(m) for m in recipe.min_sizes]
    wanted["sigma"] = float(recipe.sigma)
    if params_file.is_file() and not overwrite:
        found = json.loads(params_file.read_text())
        if found != wanted:
            raise SystemExit(
                f"error: {out} holds masks made with {found}, not {wanted}.\n"
                "Use another --out folder, or --overwrite to recompute every mask."
            )
    out.mkdir(parents=True, exist_ok=True)
    tmp = params_file.with_name(params_file.name + ".tmp")
    tmp.write_text(json.dumps(wanted, indent=2) + "\n")
    os.replace(tmp, params_file)


def preprocess(
    images: Path, out: Path, recipe: FHRecipe, workers: int, verify: bool = False, overwrite: bool = False
) -> dict:
    """Segments every image under ``images`` into ``out``; returns a summary dict."""
    _check_params(out, recipe, overwrite)
    for stale in out.rglob(f".*{MASK_SUFFIX}.*.tmp"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
    relative_paths = list_images(images)
    jobs, skipped, regenerated = [], 0, []
    for relative in relative_paths:
        mask_file = mask_path(out, relative)
        if mask_file.is_file() and not overwrite:
            if verify and (problem := _check_mask(mask_file, images / relative, recipe)) is not None:
                regenerated.append((str(mask_file), problem))
                mask_file.unlink()
            else:
                skipped += 1
                continue
        jobs.append((images / relative, mask_file))
    for path, problem in regenerated:
        print(f"bad mask, regenerating: {path}: {problem}", file=sys.stderr)

    failures: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(job: tuple[Path, Path]) -> None:
        try:
            _segment_one(*job, recipe)
        except ImageDecodeError as error:
            with lock:
                failures.append((error.path, error.reason))
            tqdm.write(f"skipped {error.path}: {error.reason}", file=sys.stderr)
        except ValueError as error:  # e.g. more than 65535 segments
            with lock:
                failures.append((str(job[0]), str(error)))
            tqdm.write(f"skipped {job[0]}: {error}", file=sys.stderr)

    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(jobs), unit="img", desc=f"FH {out.name}", dynamic_ncols=True, mininterval=1.0
    ) as progress:
        for _ in pool.map(work, jobs):
            progress.update()

    failures_file = out / FAILURES_FILE
    if failures:
        tmp = failures_file.with_name(failures_file.name + ".tmp")
        tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in sorted(failures)))
        os.replace(tmp, failures_file)
    else:
        failures_file.unlink(missing_ok=True)
    return {
        "images": len(relative_paths),
        "written": len(jobs) - len(failures),
        "skipped_existing": skipped,
        "regenerated": len(regenerated),
        "failed": len(failures),
        "failures_file": str(failures_file) if failures else None,
    }


def _parse_numbers(text: str, kind: type) -> tuple:
    try:
        return tuple(kind(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rmae.preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("what to segment (a dataset split, or any folder)")
    source.add_argument("--dataset", choices=sorted(RECIPES), help="dataset under $E2E_DATASETS / --root")
    source.add_argument("--split", help="coco: train2017, val2017, unlabeled2017; imnet: train, val")
    source.add_argument("--root", type=Path, default=Path(os.environ.get("E2E_DATASETS", ".data")),
                        help="datasets root (default: $E2E_DATASETS or .data)")
    source.add_argument("--images", type=Path, help="generic mode: a folder of images (recursive)")
    source.add_argument("--out", type=Path, help="generic mode: the mask folder (mirrors --images)")
    recipe = parser.add_argument_group("FH recipe (defaults: the dataset's official one; generic mode: COCO's)")
    recipe.add_argument("--scales", type=lambda t: _parse_numbers(t, float), help="e.g. 500,1000,1500")
    recipe.add_argument("--min-sizes", type=lambda t: _parse_numbers(t, int), help="default: equal to the scales")
    recipe.add_argument("--sigma", type=float, help="Gaussian sigma (default 0.8)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="threads (default: all cores)")
    parser.add_argument("--verify", action="store_true", help="re-check existing masks; regenerate bad ones")
    parser.add_argument("--overwrite", action="store_true", help="recompute every mask (also after a recipe change)")
    args = parser.parse_args(argv)

    if args.images is not None or args.out is not None:
        if args.dataset is not None or args.images is None or args.out is None:
            parser.error("generic mode takes both --images and --out, and no --dataset")
        if not args.images.is_dir():
            parser.error(f"--images {args.images} is not a folder")
        images, out, base = args.images, args.out, RECIPES["coco"]
    elif args.dataset is not None:
        if args.split is None:
            parser.error(f"--dataset {args.dataset} needs --split ({', '.join(SPLITS[args.dataset])})")
        images, out = dataset_folders(args.dataset, args.split, args.root)
        base = RECIPES[args.dataset]
    else:
        parser.error("give --dataset and --split, or --images and --out")
    scales = args.scales or base.scales
    min_sizes = args.min_sizes or (tuple(int(s) for s in scales) if args.scales else base.min_sizes)
    if len(min_sizes) != len(scales):
        parser.error(f"{len(scales)} scales but {len(min_sizes)} min sizes")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    chosen = FHRecipe(tuple(float(s) for s in scales), tuple(min_sizes), base.sigma if args.sigma is None else args.sigma)
    try:  # validates the recipe before any work starts
        fh.felzenszwalb_multi(np.zeros((2, 2, 3), np.uint8), chosen.scales, chosen.sigma, chosen.min_sizes)
    except (ValueError, TypeError) as error:
        parser.error(str(error))

    summary = preprocess(images, out, chosen, args.workers, verify=args.verify, overwrite=args.overwrite)
    print(
        f"{summary['images']} images: {summary['written']} written, {summary['skipped_existing']} already done, "
        f"{summary['regenerated']} regenerated, {summary['failed']} failed"
        + (f" (listed in {summary['failures_file']})" if summary["failed"] else "")
    )
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
