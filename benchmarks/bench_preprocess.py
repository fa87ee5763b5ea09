"""Mask preprocessing end to end: ``python -m rmae.preprocess`` on a folder of 640×480 JPEGs.

The whole CLI as a user runs it (decode, FH with the COCO recipe, uint16 zstd mask files written
atomically, progress bar), on 1 and then 2 worker threads, each time into an empty output folder; and, on
a few of the same images, scikit-image's three FH calls (the original's per-image work, without its
decode and writes). Reports images/s and the core-hours the COCO recipe would take for train2017 +
unlabeled2017 (241,690 images) at this image size.

    python benchmarks/bench_preprocess.py [--images 160] [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import felzenszwalb as skimage_felzenszwalb

from rmae.recipes import COCO_FH
from common import machine, photo_640x480, write_report

COCO_IMAGES = 118_287 + 123_403  # train2017 + unlabeled2017


def make_folder(root: Path, count: int) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    for n in range(count):
        photo_640x480(n).save(images / f"{n:06d}.jpg", quality=90)
    return images


def run_cli(images: Path, out: Path, workers: int) -> float:
    """Wall seconds of one complete preprocessing run into an empty folder."""
    cmd = [sys.executable, "-m", "rmae.preprocess", "--images", str(images), "--out", str(out),
           "--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def skimage_seconds_per_image(images: Path, count: int) -> float:
    total = 0.0
    for path in sorted(images.iterdir())[:count]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        start = time.perf_counter()
        for scale, min_size in zip(COCO_FH.scales, COCO_FH.min_sizes):
            skimage_felzenszwalb(rgb, scale=scale, sigma=COCO_FH.sigma, min_size=min_size, channel_axis=-1)
        total += time.perf_counter() - start
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--skimage-images", type=int, default=4, help="images timed with scikit-image (slow)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = make_folder(Path(tmp), args.images)
        runs = {}
        for workers in (1, 2):
            best = min(run_cli(images, Path(tmp) / f"masks_{workers}_{r}", workers) for r in range(2))
            runs[workers] = best
        ref = skimage_seconds_per_image(images, args.skimage_images)
    ours = runs[1] / args.images
    result = {
        "machine": machine(), "images": args.images, "size": "640x480 JPEG q90", "recipe": "COCO (3 scales)",
        "cli_seconds": runs, "cli_ms_per_image_1_worker": 1e3 * ours,
        "cli_images_per_s": {w: args.images / s for w, s in runs.items()},
        "skimage_fh_ms_per_image": 1e3 * ref, "load_average": os.getloadavg(),
        "coco_core_hours_rmae": COCO_IMAGES * ours / 3600, "coco_core_hours_skimage_fh": COCO_IMAGES * ref / 3600,
    }
    table = "\n".join([
        f"Machine: {result['machine']}. {args.images} bundled photos as 640×480 JPEG (q90), COCO recipe (scales "
        f"500/1000/1500 = min sizes, sigma 0.8); best of 2 complete CLI runs (each into an empty folder, the "
        f"process start included); scikit-image: FH alone on {args.skimage_images} of the images; load "
        f"average {result['load_average'][0]:.2f}.",
        "",
        "| what | ms / image | images/s | COCO train2017 + unlabeled2017 (241,690 images) |",
        "|---|---:|---:|---:|",
        f"| `python -m rmae.preprocess`, 1 worker (decode + FH + write) | {1e3 * ours:.1f} | "
        f"{args.images / runs[1]:.1f} | {result['coco_core_hours_rmae']:.1f} core-hours |",
        f"| `python -m rmae.preprocess`, 2 workers | {1e3 * runs[2] / args.images:.1f} | "
        f"{args.images / runs[2]:.1f} | |",
        f"| scikit-image, three FH calls alone (the original's work per image, 1 core) | {1e3 * ref:.0f} | "
        f"{1 / ref:.2f} | {result['coco_core_hours_skimage_fh']:.0f} core-hours |",
    ])
    print(table)
    write_report(args.out / "bench_preprocess", result, table)


if __name__ == "__main__":
    main()
