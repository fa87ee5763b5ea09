"""Mask preprocessing end to end: ``python -m rmae.preprocess`` on a folder of 640×480 JPEGs.

On a few of the images, interleaved image by image on the same decoded pixels: scikit-image's three FH calls
(the original's per-image work, without its decode and writes), rmae's FH alone, and rmae's whole per-image
work (decode, FH, atomic uint16 zstd write), with the ratios to scikit-image. Then the whole CLI as a user
runs it (progress bar, process start included) on 1 and 2 worker threads, each time into an empty output
folder. Reports images/s and the core-hours the COCO recipe would take for train2017 + unlabeled2017
(241,690 images) at this image size.

    python benchmarks/bench_preprocess.py [--images 160] [--skimage-images 8] [--repeats 2] [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import felzenszwalb as skimage_felzenszwalb

from rmae.recipes import COCO_FH
from common import machine, photo_640x480, round_robin, write_report

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


def per_image_seconds(images: Path, count: int, repeats: int, scratch: Path) -> dict:
    """Seconds per image, interleaved image by image on the same decoded pixels (best of ``repeats`` each, after
    one warm-up call): scikit-image's three FH calls (the original's work), rmae's FH alone (one call for the
    three scales), and rmae's whole per-image work in the CLI (decode, FH, atomic uint16 zstd write)."""
    from rmae import fh
    from rmae.preprocess import _segment_one

    def skimage_fh(rgb):
        for scale, min_size in zip(COCO_FH.scales, COCO_FH.min_sizes):
            skimage_felzenszwalb(rgb, scale=scale, sigma=COCO_FH.sigma, min_size=min_size, channel_axis=-1)

    def rmae_fh(rgb):
        fh.felzenszwalb_multi(rgb, COCO_FH.scales, COCO_FH.sigma, COCO_FH.min_sizes)

    def rmae_pipeline(path):  # what each of the CLI's workers runs per image
        _segment_one(path, scratch / (path.stem + ".npy.zst"), COCO_FH)

    totals = {"skimage FH": 0.0, "rmae FH": 0.0, "rmae decode + FH + write": 0.0}
    timed = sorted(images.iterdir())[:count]
    for path in timed:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        calls = {"skimage FH": lambda: skimage_fh(rgb), "rmae FH": lambda: rmae_fh(rgb),
                 "rmae decode + FH + write": lambda: rmae_pipeline(path)}
        rmae_fh(rgb), rmae_pipeline(path)  # warm-up: the threads' scratch space, the encoder
        for name, seconds in zip(calls, round_robin(list(calls.values()), repeats)):
            totals[name] += min(seconds)
    return {name: total / len(timed) for name, total in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--skimage-images", type=int, default=8,
                    help="images timed one by one against scikit-image (slow), interleaved")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many, per image and method")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()
    args.skimage_images = max(1, min(args.skimage_images, args.images))  # (the images there are)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_folder(Path(tmp), args.images)
        (Path(tmp) / "scratch").mkdir()
        per_image = per_image_seconds(images, args.skimage_images, args.repeats, Path(tmp) / "scratch")
        runs = {}
        for workers in (1, 2):
            best = min(run_cli(images, Path(tmp) / f"masks_{workers}_{r}", workers) for r in range(2))
            runs[workers] = best
    ref, fh_alone, pipeline = per_image["skimage FH"], per_image["rmae FH"], per_image["rmae decode + FH + write"]
    cli = runs[1] / args.images
    result = {
        "machine": machine(), "images": args.images, "size": "640x480 JPEG q90", "recipe": "COCO (3 scales)",
        "per_image_seconds": per_image, "skimage_images": args.skimage_images,
        "speedup_fh": ref / fh_alone, "speedup_pipeline": ref / pipeline,
        "cli_seconds": runs, "cli_ms_per_image_1_worker": 1e3 * cli,
        "cli_images_per_s": {w: args.images / s for w, s in runs.items()},
        "coco_core_hours_rmae_cli": COCO_IMAGES * cli / 3600, "coco_core_hours_skimage_fh": COCO_IMAGES * ref / 3600,
    }
    table = "\n".join([
        f"Machine: {result['machine']}. {args.images} bundled photos as 640×480 JPEG (q90), COCO recipe (scales "
        f"500/1000/1500 = min sizes, sigma 0.8). Per image: the first {args.skimage_images} images, the methods "
        f"interleaved image by image on the same decoded pixels, best of {args.repeats} after a warm-up call. CLI: "
        "best of 2 complete runs, each into an empty folder, the process start included.",
        "",
        "| what | ms / image | images/s | vs scikit-image (same run) | COCO train2017 + unlabeled2017 (241,690 images) |",
        "|---|---:|---:|---:|---:|",
        f"| scikit-image, three FH calls (the original's work per image; decode and write not counted) | "
        f"{1e3 * ref:.0f} | {1 / ref:.2f} | 1× | {result['coco_core_hours_skimage_fh']:.0f} core-hours |",
        f"| rmae FH, the three scales in one call | {1e3 * fh_alone:.1f} | {1 / fh_alone:.1f} | "
        f"**{ref / fh_alone:.1f}×** | |",
        f"| rmae decode + FH + write (the CLI's work per image, in process) | {1e3 * pipeline:.1f} | "
        f"{1 / pipeline:.1f} | **{ref / pipeline:.1f}×** | |",
        f"| `python -m rmae.preprocess`, 1 worker, {args.images} images | {1e3 * cli:.1f} | {1 / cli:.1f} | | "
        f"{result['coco_core_hours_rmae_cli']:.1f} core-hours |",
        f"| `python -m rmae.preprocess`, 2 workers | {1e3 * runs[2] / args.images:.1f} | "
        f"{args.images / runs[2]:.1f} | | |",
    ])
    print(table)
    write_report(args.out / "bench_preprocess", result, table)


if __name__ == "__main__":
    main()
