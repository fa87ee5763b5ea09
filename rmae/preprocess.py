"""Precompute FH region masks: ``python -m rmae.preprocess``.

    python -m rmae.preprocess --dataset coco --split train2017      # also val2017, unlabeled2017
    python -m rmae.preprocess --dataset imnet --split train          # also val
    python -m rmae.preprocess --images DIR --out DIR [--scales 500,1000,1500]

Datasets live under ``$E2E_DATASETS`` (default ``.data``); masks go where the data pipeline reads
them (``coco/image/fh_<split>/<stem>.npy.zst``, ``imagenet/fh_<split>/<class>/<stem>.npy.zst``) with
the official recipes as defaults. Runs on all cores, shows a progress bar, skips finished files
(every write is atomic, so a killed run is simply started again; a killed ``--overwrite`` run is
resumed too: ``fh_params.json`` marks it unfinished, and masks older than its start are redone),
lists the images it could not segment (undecodable, broken links, two images sharing one mask name,
...) in ``preprocess_failures.tsv`` and then exits with status 1 (with ``--allow-bad-images``: 0 when they are
all images whose content cannot be decoded, which training replaces with others). ``--verify`` re-checks
existing masks and regenerates the bad ones.
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m rmae.preprocess: a Ctrl-C while the libraries load exits quietly (rmae.cli)
    from rmae.cli import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading()

import argparse
import collections
import contextlib
import errno
import json
import os
import signal
import stat
import sys
import threading
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from rmae import fh, listing
from rmae.cores import command_name, usable_cores
from rmae.image_io import IMAGE_SUFFIXES, ImageDecodeError, is_wide, load_rgb, open_rgb
from rmae.logging_utils import progress_bar
from rmae.masks import (DECODE_VERSION, MASK_SUFFIX, PARAMS_FILE, REDO_KEY, MaskError, load_labels,
                        mask_path, recorded_recipe, save_labels, shared_mask_names)
from rmae.recipes import COCO_FH, IMAGENET_FH, FHRecipe, dataset_name, dataset_root, folder_command, recipe_folder

try:
    import fcntl
except ImportError:  # not on Windows: runs into one folder are not locked
    fcntl = None

__all__ = ["RECIPES", "PreprocessError", "dataset_folders", "list_images", "main", "preprocess", "scan_images"]

FAILURES_FILE = "preprocess_failures.tsv"
LOCK_FILE = ".preprocess.lock"  # held (flock) by the run writing into the folder


RECIPES = {"coco": COCO_FH, "imnet": IMAGENET_FH}
SPLITS = {"coco": ("train2017", "val2017", "unlabeled2017"), "imnet": ("train", "val")}


class PreprocessError(Exception):
    """A run that cannot start (no such split or image folder, a mask folder of another recipe, ...); the
    message says why and what to do. The command line prints it as ``error: ...`` and exits with status 2."""


def dataset_folders(dataset: str, split: str, root: Path) -> tuple[Path, Path]:
    """(image folder, mask folder) of a dataset split under ``root``, as the README's Datasets section lays them out."""
    if split not in SPLITS[dataset]:
        raise PreprocessError(f"--dataset {dataset} has splits {', '.join(SPLITS[dataset])}; got {split!r}")
    if dataset == "coco":
        images, masks = root / "coco" / "image" / split, root / "coco" / "image" / f"fh_{split}"
        layout = f"{root}/coco/image/{split}/<image>.jpg"
    else:
        bases = (root / "imagenet", root / "imnet")  # per split, as the data pipeline decides
        base = next((b for b in bases if (b / split).is_dir()), bases[0])
        images, masks = base / split, base / f"fh_{split}"
        layout = f"{root}/imagenet/{split}/<class>/<image>.JPEG   (or {root}/imnet/...)"
    if not images.is_dir():
        raise PreprocessError(
            f"image folder {images} not found.\nExpected layout: {layout}\n"
            f"Set $E2E_DATASETS or --root to the folder that holds it."
        )
    return images, masks


def scan_images(folder: Path) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """(image files, broken links named like images, folders that cannot be listed with why) under
    ``folder``, recursively, as paths relative to it: exactly the images the data pipeline lists
    (``rmae.listing.scan_images``: symlinked folders followed, hidden files skipped)."""
    scan = listing.scan_images(folder)
    return ([Path(p) for p in scan.images], [Path(p) for p in scan.broken_links],
            [(Path(p), why) for p, why in scan.unlistable])


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, following symlinked folders), as paths relative to it."""
    return scan_images(folder)[0]


def _mask_collisions(relative_paths: list[Path]) -> list[tuple[Path, str]]:
    """Images that share their mask file with another image (x.jpg and x.png both map to x.npy.zst), with why."""
    collisions = []
    for mask, group in shared_mask_names(relative_paths).items():
        for relative in group:
            others = ", ".join(str(other) for other in group if other != relative)
            collisions.append((relative, f"same mask file {mask} as {others}: rename one of the images"))
    return collisions


def _check_mask(mask_file: Path, image_file: Path, recipe: FHRecipe) -> str | None:
    """Why an existing mask is bad, or None when it is sound. An error of the file system (permissions, I/O) on
    the mask or the image is raised: the image is then a failure and its mask is kept."""
    raw = mask_file.read_bytes()  # (an error of the file system is raised, not taken as a bad mask)
    try:
        with Image.open(image_file) as image:
            width, height = image.size
    except OSError as error:
        if error.errno is not None:  # the file system's (the file cannot be read now), not the image's
            raise
        return f"image unreadable ({error})"
    except Exception as error:  # the image itself is broken: nothing to compare against
        return f"image unreadable ({error})"
    expected = (len(recipe.scales), height, width)
    try:  # (a file that would decompress to more than this image's mask is not decompressed)
        labels = load_labels(raw, mask_file, max_bytes=2 * int(np.prod(expected)) + 4096)
    except MaskError as error:
        return str(error)
    if labels.shape != expected or labels.dtype != np.uint16:
        return f"holds {labels.dtype} {labels.shape}, expected uint16 {expected}"
    for scale_labels in labels:
        present = np.unique(scale_labels)
        if present[0] != 0 or present[-1] != len(present) - 1:
            return "labels are not numbered 0..n-1"
    return None


# FH's peak memory per pixel, for the image's decoding, edges and label maps: measured 150 B with one scale and 219 B
# with three on photos, up to 310 B for three on an image of one colour (all its edges in one sort bucket)
BYTES_PER_PIXEL, BYTES_PER_PIXEL_PER_SCALE = 200, 40
DECODE_BYTES_PER_PIXEL = 16  # decoding alone: Pillow's buffer (up to 4 bytes a pixel; 16-bit: more) and the RGB copy


def available_memory() -> int | None:
    """Bytes this process may still use: what the kernel reports available or, when less, what is left of the
    cgroup's limit (a container's, a Slurm job's); None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                found.append(max(0, int(limit) - int(usage)))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def _amount(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


class ImageTooLargeError(MemoryError):
    """An image whose segmentation alone needs more memory than the run may use."""


class MemoryGate:
    """Lets segmentations run together while their estimated memory fits ``budget`` (bytes; None: no limit), in the
    order they ask: a large image waits for the others to finish rather than all of them taking the machine down
    (the workers are threads of one process, which the kernel's OOM killer would end, every rerun at the same
    image). One that needs more than the whole budget is refused (ImageTooLargeError)."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self._free = budget
        self._turns: collections.deque = collections.deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str):
        if self.budget is None:
            yield
            return
        if nbytes > self.budget:
            raise ImageTooLargeError(
                f"{what} needs about {_amount(nbytes)} to segment, more than the {_amount(self.budget)} this run may "
                "use: segment it on a machine (or in a job) with more memory")
        with self._changed:
            turn = object()
            self._turns.append(turn)
            while self._turns[0] is not turn or self._free < nbytes:
                self._changed.wait()
            self._turns.popleft()
            self._free -= nbytes
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._changed:
                self._free += nbytes
                self._changed.notify_all()


def _segmentation_bytes(image_file: Path, recipe: FHRecipe) -> tuple[int, str]:
    """FH's estimated peak memory for ``image_file`` from its header (0 when the header cannot be read: decoding
    then reports why), and the image's size in words."""
    try:
        with Image.open(image_file) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 (a bad file: its decoding says what is wrong with it)
        return 0, str(image_file)
    per_pixel = BYTES_PER_PIXEL + BYTES_PER_PIXEL_PER_SCALE * len(recipe.scales)
    return width * height * per_pixel, f"{image_file} ({width}x{height} pixels, {len(recipe.scales)} FH scale(s))"


def _decode_within(image_file: Path, gate: MemoryGate) -> None:
    """Decodes an image too large to segment, when its pixels alone fit ``gate``'s budget: a corrupt or truncated
    file whose header claims a huge size then fails as what it is (ImageDecodeError, a bad image that training
    replaces), not as too large (which --allow-bad-images does not excuse)."""
    with Image.open(image_file) as image:
        width, height = image.size
    nbytes = width * height * DECODE_BYTES_PER_PIXEL
    if nbytes <= gate.budget:
        with gate.reserve(nbytes, f"{image_file} ({width}x{height} pixels)"):
            open_rgb(image_file)


def _segment_one(image_file: Path, mask_file: Path, recipe: FHRecipe) -> None:
    image = load_rgb(image_file)
    labels = fh.felzenszwalb_multi(image, recipe.scales, recipe.sigma, recipe.min_sizes)
    save_labels(mask_file, labels)


def _recipe_params(recipe: FHRecipe) -> dict:
    """The recipe as ``PARAMS_FILE`` records it."""
    params = {**asdict(recipe), "format": f"uint16 [S, H, W] {MASK_SUFFIX}", "decode": DECODE_VERSION}
    params["scales"] = [float(s) for s in recipe.scales]
    params["min_sizes"] = [int(m) for m in recipe.min_sizes]
    params["sigma"] = float(recipe.sigma)
    return params


def _write_params(out: Path, params: dict) -> None:
    params_file = out / PARAMS_FILE
    tmp = params_file.with_name(params_file.name + ".tmp")
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, params_file)


def _file_system_now(folder: Path) -> int:
    """The clock that stamps mask mtimes (ns): the mtime of a file written in ``folder`` now."""
    probe = folder / ".fh_clock.tmp"
    probe.write_bytes(b"now")  # a write with data always stamps the mtime
    try:
        return probe.stat().st_mtime_ns
    finally:
        probe.unlink(missing_ok=True)


def _read_params(params_file: Path) -> dict:
    """The recipe a mask folder records; a file that is not one this tool wrote is a clear error."""
    try:
        found = json.loads(params_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        found, reason = None, f"{type(error).__name__}: {error}"
    else:
        reason = "not a JSON object"
    if not isinstance(found, dict):
        raise PreprocessError(f"{params_file} cannot be read as the recipe of the masks in its folder ({reason}).\n"
                         "It is written by this tool; --overwrite recomputes every mask and rewrites it.")
    return found


def _check_params(out: Path, recipe: FHRecipe, overwrite: bool, images: Path) -> tuple[int | None, bool]:
    """Refuses to mix recipes in one mask folder and records the recipe; returns the start (mtime clock,
    ns) of an unfinished redo (else None) and whether the folder's masks were made with an older decoding
    (``DECODE_VERSION``).

    A redo is an --overwrite run, and the runs that resume it after a kill: ``PARAMS_FILE`` records its
    start before any mask is recomputed, and masks not written after that start may be another recipe's,
    so they do not count as done until ``_finish_redo``.
    """
    wanted = _recipe_params(recipe)
    found = _read_params(out / PARAMS_FILE) if (out / PARAMS_FILE).is_file() and not overwrite else None
    if found is not None:
        redo_since = found.pop(REDO_KEY, None)
        decode = found.pop("decode", 1)
        if found != {k: v for k, v in wanted.items() if k != "decode"} or decode > DECODE_VERSION:
            unfinished = " (an --overwrite run to it did not finish)" if redo_since is not None else ""
            newer = f" (a newer rmae's image decoding, {decode})" if decode > DECODE_VERSION else ""
            made = recorded_recipe(found)
            if made == recipe:  # the same FH parameters: another decoding, file format or record
                if newer:
                    what = newer.strip(" ()") + f"{unfinished}, not this rmae's (decoding {DECODE_VERSION})"
                else:
                    other = sorted(k for k in set(found) | set(wanted) - {"decode"} if found.get(k) != wanted.get(k))
                    what = (", ".join(f"{k} {found.get(k)!r}" for k in other) + f"{unfinished}, not this rmae's ("
                            + ", ".join(f"{k} {wanted.get(k)!r}" for k in other) + ")")
                what = "the same FH recipe but " + what
            else:
                what = f"FH {made.describe()}" if made is not None else f"{found}"
                what += f"{unfinished}{newer}, not with FH {recipe.describe()}"
            elsewhere = recipe_folder(out.resolve(), recipe)
            raise PreprocessError(
                f"{out} holds masks made with {what}.\nMake this recipe's masks in a folder of their own (a training "
                f"run whose recipe has {len(recipe.scales)} scale(s) reads them with mask_folder=[{elsewhere}]):\n"
                f"    {folder_command(images.resolve(), elsewhere, recipe)}\n"
                "or add --overwrite to recompute every mask in this folder.")
        return redo_since, decode < DECODE_VERSION
    if not overwrite and not (out / PARAMS_FILE).exists():
        _check_unrecorded_masks(out, recipe)
    out.mkdir(parents=True, exist_ok=True)
    redo_since = _file_system_now(out) if overwrite else None
    _write_params(out, wanted if redo_since is None else {**wanted, REDO_KEY: redo_since})
    return redo_since, False


def _check_unrecorded_masks(out: Path, recipe: FHRecipe, looked_at: int = 3) -> None:
    """Masks already in a folder without a recipe record (copied without it, made by hand) would count as done
    for this recipe: a few are read, and another number of scales is refused (PreprocessError); the same number
    is taken as this recipe's, with a note (no file tells more)."""
    masks = []
    for folder, files in _walk_own(out):
        masks += [Path(folder, name) for name in sorted(files) if name.endswith(MASK_SUFFIX)][: looked_at - len(masks)]
        if len(masks) >= looked_at:
            break
    for mask_file in masks:
        try:
            scales = load_labels(mask_file).shape[0]
        except (MaskError, OSError):  # unreadable: --verify remakes such a mask
            continue
        if scales != len(recipe.scales):
            raise PreprocessError(
                f"{out} holds masks but no record of their FH recipe ({PARAMS_FILE}), and {mask_file} has "
                f"{scales} scale(s), not the {len(recipe.scales)} of FH {recipe.describe()}: they would count as "
                "done. Give another --out, or add --overwrite to recompute every mask in this folder.")
    if masks:
        print(_shown(f"note: {out} holds masks but no record of their FH recipe ({PARAMS_FILE}); they are taken as "
                     f"FH {recipe.describe()}'s (their number of scales matches; --overwrite recomputes them)"),
              file=sys.stderr)


def _decoded_differently(image_file: Path) -> bool:
    """Whether an older rmae decoded this image to other pixels (16-bit, 32-bit or float: it clipped them)."""
    try:
        with Image.open(image_file) as image:
            return is_wide(image.mode)
    except OSError as error:
        if error.errno is not None:  # the file system's error (permissions, too many files, ...): not checked
            raise
        return False  # not an image Pillow reads (any more): its mask stays as it is
    except (ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _walk_own(out: Path):
    """(folder, file names) of mask folder ``out`` and its subfolders, but not of subfolders that are mask folders
    of their own (a ``PARAMS_FILE`` or a run's ``LOCK_FILE``: another run's masks, never this one's)."""
    for folder, subfolders, files in os.walk(out):
        subfolders[:] = [name for name in subfolders if not any(
            os.path.lexists(os.path.join(folder, name, marker)) for marker in (PARAMS_FILE, LOCK_FILE))]
        yield folder, files


def _own_files(out: Path, keep) -> list[Path]:
    """The files of mask folder ``out`` (``_walk_own``) whose names ``keep`` accepts."""
    return [Path(folder, name) for folder, files in _walk_own(out) for name in files if keep(name)]


def _finish_redo(out: Path, recipe: FHRecipe, listed: set[Path] | None = None) -> None:
    """Records that every mask in ``out`` is now the recipe's (the redo is complete). After a redo (``listed``: the
    masks of the images listed now), the other masks first go: the old recipe's masks of images no longer in the
    folder, which would otherwise be taken as done should such an image come back (not in subfolders that are mask
    folders of their own)."""
    if listed is not None:
        for mask_file in _own_files(out, lambda name: name.endswith(MASK_SUFFIX)):
            if mask_file not in listed:
                mask_file.unlink(missing_ok=True)
    _write_params(out, _recipe_params(recipe))


def _mask_done(mask_file: Path, redo_since: int | None) -> bool:
    """Whether ``mask_file`` exists and, during a redo, was written after the redo started."""
    try:
        info = mask_file.stat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and (redo_since is None or info.st_mtime_ns > redo_since)


def _drop_stale_mask(mask_file: Path, redo_since: int | None) -> None:
    """During a redo, removes the mask of an image that gets no new one, unless the redo wrote it."""
    if redo_since is not None and mask_file.is_file() and not _mask_done(mask_file, redo_since):
        mask_file.unlink(missing_ok=True)


def _failure_reason(error: Exception) -> str:
    if isinstance(error, ValueError):  # e.g. more than 65536 segments
        return str(error)
    return f"{type(error).__name__}: {error}"


def _tsv_field(text: str) -> str:
    """``text`` as one field of a tab-separated line: backslash, tab and line breaks escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _write_failures(failures_file: Path, failures: list[tuple[str, str]]) -> bool:
    """Writes (atomically) or removes the failures file; False (and the list on stderr) when it cannot be written."""
    tmp = failures_file.with_name(failures_file.name + ".tmp")
    try:
        if not failures:
            if os.path.lexists(failures_file):  # (a read-only folder refuses even the removal of nothing)
                failures_file.unlink()
            return True
        text = "".join(f"{_tsv_field(path)}\t{_tsv_field(reason)}\n" for path, reason in sorted(failures))
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")  # file names as their bytes
        os.replace(tmp, failures_file)
        return True
    except OSError as error:
        with contextlib.suppress(OSError):  # a disk full half way: no partial file left behind
            tmp.unlink(missing_ok=True)
        print(_shown(f"warning: cannot write {failures_file} ({error}); the failures:"), file=sys.stderr)
        for path, reason in sorted(failures):
            print(_shown(f"  {path}: {reason}"), file=sys.stderr)
        return False


def _run_bounded(pool: ThreadPoolExecutor, work, jobs: list, limit: int, on_done) -> None:
    """``work(job)`` for every job on ``pool`` with at most ``limit`` queued at a time (a million pending futures
    would cost gigabytes before the first image is done); ``on_done()`` after each."""
    def finish_some(pending: set) -> set:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            future.result()
            on_done()
        return pending

    pending = set()
    for job in jobs:
        if len(pending) >= limit:
            pending = finish_some(pending)
        pending.add(pool.submit(work, job))
    while pending:
        pending = finish_some(pending)


def _shown(text: str) -> str:
    """``text`` safe to print: file-name bytes that are not UTF-8 appear as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def _only_run_into(out: Path):
    """Holds ``out``'s lock file for the run: a second run into the same folder (which would delete the first's
    files in flight and its failures list) is refused. A folder that cannot be written is not locked."""
    if not out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(out / LOCK_FILE, "a")
    except OSError:  # read-only: no run can write into it
        yield
        return
    with handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PreprocessError(f"another rmae.preprocess run is writing into {out}; wait for it to finish "
                                      "(or use another --out)") from None
            except OSError as error:  # a file system without locks (some NFS, Lustre without flock)
                print(f"note: {out} cannot be locked ({error.strerror or error}); do not start a second run into "
                      "it until this one ends", file=sys.stderr)
        yield


def preprocess(
    images: Path, out: Path, recipe: FHRecipe, workers: int, verify: bool = False, overwrite: bool = False
) -> dict:
    """Segments every image under ``images`` into ``out``; returns a summary dict."""
    with _only_run_into(out):
        return _preprocess(images, out, recipe, workers, verify, overwrite)


def _preprocess(images: Path, out: Path, recipe: FHRecipe, workers: int, verify: bool, overwrite: bool) -> dict:
    redo_since, old_decode = _check_params(out, recipe, overwrite, images)
    for stale in _own_files(out, lambda name: name.startswith(".") and name.endswith(".tmp") and MASK_SUFFIX in name):
        stale.unlink(missing_ok=True)  # left by a run killed mid-write (not another run's, in a folder of its own)
    relative_paths, broken_links, unlistable = scan_images(images)
    not_segmented = [(relative, "broken symbolic link (its target does not exist or cannot be reached)")
                     for relative in broken_links]
    not_segmented += _mask_collisions(relative_paths)
    for relative, _ in not_segmented:
        _drop_stale_mask(mask_path(out, relative), redo_since)
    failures = [(str(images / relative), reason) for relative, reason in unlistable + not_segmented]
    # the failures training does without: images whose content cannot be decoded (the loader replaces them; not
    # broken links, which an annotation file may still list, nor the file system's errors, which may pass)
    bad_images = 0
    for path, reason in failures:  # on the console like the images that fail to decode
        print(_shown(f"failed {path}: {reason}"), file=sys.stderr)
    excluded = {relative for relative, _ in not_segmented}
    # (image, mask, whether the mask exists and is checked first: by --verify, and in a folder of an older
    # decoding for the image's depth)
    jobs, skipped = [], 0
    for relative in relative_paths:
        mask_file = mask_path(out, relative)
        if relative in excluded:
            continue
        if not overwrite and _mask_done(mask_file, redo_since):
            if verify or old_decode:
                jobs.append((images / relative, mask_file, True))
            else:
                skipped += 1
            continue
        jobs.append((images / relative, mask_file, False))
    if any(not existing for _, _, existing in jobs) and not os.access(out, os.W_OK):
        raise PermissionError(f"cannot write masks into {out}: the folder is not writable")

    lock = threading.Lock()
    counts = {"written": 0, "skipped": skipped, "regenerated": 0, "unchecked": 0}
    available = available_memory()
    disk_full = threading.Event()
    gate = MemoryGate(None if available is None else int(0.85 * available))

    def work(job: tuple[Path, Path, bool]) -> None:
        nonlocal bad_images
        image_file, mask_file, existing = job
        if disk_full.is_set():
            return
        try:
            if existing:
                problem = _check_mask(mask_file, image_file, recipe) if verify else None
                if problem is None and old_decode and _decoded_differently(image_file):
                    problem = "made by an older rmae from this 16/32-bit or float image's clipped pixels"
                if problem is None:
                    with lock:
                        counts["skipped"] += 1
                    return
                tqdm.write(_shown(f"bad mask, regenerating: {mask_file}: {problem}"), file=sys.stderr)
                mask_file.unlink(missing_ok=True)
            nbytes, what = _segmentation_bytes(image_file, recipe)
            if gate.budget is not None and nbytes > gate.budget:
                _decode_within(image_file, gate)  # a damaged file whose header claims a huge size: a bad image
            with gate.reserve(nbytes, what):
                _segment_one(image_file, mask_file, recipe)
        except Exception as error:  # one image fails (bad file, name too long, MemoryError, ...), not the run
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                disk_full.set()  # every later mask would fail the same way: the run stops
            if existing:
                with lock:
                    counts["unchecked"] += 1  # its existing mask may still be of the older decoding
            if isinstance(error, ImageDecodeError):
                path, reason = error.path, error.reason
                if error.content:
                    with lock:
                        bad_images += 1
            else:
                path, reason = str(image_file), _failure_reason(error)
            _drop_stale_mask(mask_file, redo_since)
            with lock:
                failures.append((path, reason))
            tqdm.write(_shown(f"failed {path}: {reason}"), file=sys.stderr)
            return
        with lock:
            counts["regenerated" if existing else "written"] += 1  # (the categories add up to the images)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with progress_bar(len(jobs), 0, True, desc=_shown(f"FH {out.name}"), unit="img", every=30.0) as progress:
            _run_bounded(pool, work, jobs, limit=4 * workers, on_done=progress.update)
    except BaseException:  # Ctrl-C, SIGTERM: the images being segmented finish (atomic writes), the queued do not
        pool.shutdown(wait=True, cancel_futures=True)
        _write_failures(out / FAILURES_FILE, failures)  # this run's so far, not an earlier run's list
        raise
    pool.shutdown(wait=True)
    if disk_full.is_set():
        _write_failures(out / FAILURES_FILE, failures)
        raise PreprocessError(f"the disk holding {out} is full: the masks written so far are kept; free some space "
                              "and run the same command again to continue")
    if redo_since is not None and not unlistable:  # an unlisted folder may still hold old masks
        _finish_redo(out, recipe, {mask_path(out, relative) for relative in relative_paths + broken_links})
    elif old_decode and not unlistable and not counts["unchecked"]:  # every mask is now of the current decoding
        try:
            _finish_redo(out, recipe)
        except OSError as error:  # a read-only folder of masks: they are used as they are
            print(f"note: cannot record the current image decoding in {out / PARAMS_FILE} ({error}); the next run "
                  "checks the images' headers again", file=sys.stderr)

    failures_file = out / FAILURES_FILE
    listed = _write_failures(failures_file, failures)
    return {
        "images": len(relative_paths) + len(broken_links),
        "written": counts["written"],
        "skipped_existing": counts["skipped"],
        "regenerated": counts["regenerated"],
        "failed": len(failures),
        "bad_images": bad_images,
        "failures_file": str(failures_file) if failures and listed else None,
    }


def _parse_numbers(text: str, kind: type) -> tuple:
    items = text.split(",")
    try:
        numbers = tuple(kind(item) for item in items) if all(item.strip() for item in items) else ()
    except ValueError:
        numbers = ()
    if not numbers:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (one per scale, none left empty), "
                                         f"got {text!r}")
    return numbers


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, ``kill``), handled as Ctrl-C."""


class StopHandler:
    """Ctrl-C and SIGTERM: the first stops the run (the images being segmented finish, their writes are atomic); a
    second while they finish says so and is otherwise ignored (it abandoned a worker between its temporary file and
    the rename); a third stops the process at once (the temporary file it may leave is hidden, never counted as
    done, and removed by the next run)."""

    def __init__(self):
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if self.count == 2:
            print("\nfinishing the images being segmented; a third Ctrl-C stops at once", file=sys.stderr, flush=True)
            return
        os._exit(143 if signum == signal.SIGTERM else 130)


def command(argv: list[str] | None = None) -> int:
    """``main`` as the command line runs it (``python -m rmae.preprocess``, ``rmae-preprocess``): after a stop,
    later Ctrl-Cs and SIGTERMs are ignored until the process ends (one arriving after main returned killed it by
    the signal or printed a traceback)."""
    return main(argv, command_line=True)


def main(argv: list[str] | None = None, *, command_line: bool = False) -> int:
    parser = argparse.ArgumentParser(
        prog=command_name("rmae-preprocess", "rmae.preprocess"), description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("what to segment (a dataset split, or any folder)")
    source.add_argument("--dataset", choices=sorted(RECIPES) + ["imagenet"],
                        type=dataset_name,
                        help="dataset under $E2E_DATASETS / --root (imagenet: the same as imnet)")
    source.add_argument("--split", help="coco: train2017, val2017, unlabeled2017; imnet: train, val")
    source.add_argument("--root", type=Path, help="datasets root (default: $E2E_DATASETS or .data)")
    source.add_argument("--images", type=Path, help="generic mode: a folder of images (recursive)")
    source.add_argument("--out", type=Path, help="generic mode: the mask folder (mirrors --images)")
    recipe = parser.add_argument_group("FH recipe (defaults: the dataset's official one; generic mode: COCO's)")
    recipe.add_argument("--scales", type=lambda t: _parse_numbers(t, float), help="e.g. 500,1000,1500")
    recipe.add_argument("--min-sizes", type=lambda t: _parse_numbers(t, int), help="default: equal to the scales")
    recipe.add_argument("--sigma", type=float, help="Gaussian sigma (default 0.8)")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="threads (default: all cores)")
    parser.add_argument("--verify", action="store_true", help="re-check existing masks; regenerate bad ones")
    parser.add_argument("--overwrite", action="store_true", help="recompute every mask (also after a recipe change)")
    parser.add_argument("--allow-bad-images", action="store_true",
                        help="exit status 0 when the only failures are images whose content cannot be decoded "
                             "(corrupt, truncated, not an image; still listed): training replaces them with others")
    args = parser.parse_args(argv)

    if args.images is not None or args.out is not None:
        if args.dataset is not None or args.images is None or args.out is None:
            parser.error("generic mode takes both --images and --out, and no --dataset")
        if args.split is not None or args.root is not None:
            parser.error("--split and --root choose a dataset's folders; generic mode takes --images and --out only")
        if not args.images.is_dir():
            parser.error(f"--images {args.images} is not a folder")
        if args.out.exists() and not args.out.is_dir():
            parser.error(f"--out {args.out} exists and is not a folder")
        out_dir, image_dir = args.out.resolve(), args.images.resolve()
        if out_dir == image_dir or image_dir in out_dir.parents or out_dir in image_dir.parents:
            where = ("--images" if out_dir == image_dir else "inside --images" if image_dir in out_dir.parents
                     else "a folder that holds --images")
            parser.error(f"--out {args.out} is {where} {args.images}: the masks would mix with the images (and an "
                         "--overwrite run, which removes the masks of images no longer listed, with other folders' "
                         "masks); give a folder beside it (COCO's layout: image/train2017 and image/fh_train2017)")
        images, out, base = args.images, args.out, RECIPES["coco"]
    elif args.dataset is not None:
        if args.split is None:
            parser.error(f"--dataset {args.dataset} needs --split ({', '.join(SPLITS[args.dataset])})")
        try:
            images, out = dataset_folders(args.dataset, args.split, dataset_root(args.root))
        except PreprocessError as error:
            print(_shown(f"error: {error}"), file=sys.stderr)
            return 2
        base = RECIPES[args.dataset]
    else:
        parser.error("give --dataset and --split, or --images and --out")
    scales = args.scales or base.scales
    try:  # the default min sizes validate the scales (inf, nan, negative)
        min_sizes = args.min_sizes or (tuple(fh.default_min_sizes(scales)) if args.scales else base.min_sizes)
    except ValueError as error:
        parser.error(str(error))
    if len(min_sizes) != len(scales):
        parser.error(f"{len(scales)} scales but {len(min_sizes)} min sizes")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    chosen = FHRecipe(tuple(float(s) for s in scales), tuple(min_sizes), base.sigma if args.sigma is None else args.sigma)
    try:  # validates the recipe before any work starts
        fh.felzenszwalb_multi(np.zeros((2, 2, 3), np.uint8), chosen.scales, chosen.sigma, chosen.min_sizes)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    except (OverflowError, MemoryError) as error:  # a kernel of radius 4 sigma that cannot be built
        parser.error(f"--sigma {chosen.sigma:g} is too large: its Gaussian kernel cannot be built "
                     f"({type(error).__name__}: {error})")

    main_thread = threading.current_thread() is threading.main_thread()
    stop_handler = StopHandler()
    previous = {signum: signal.signal(signum, stop_handler) for signum in (signal.SIGTERM, signal.SIGINT)} \
        if main_thread else {}
    try:
        with warnings.catch_warnings():  # (the memory gate decides what is too large, not Pillow's bomb warning)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            summary = preprocess(images, out, chosen, args.workers, verify=args.verify, overwrite=args.overwrite)
    # the mask folder cannot be made or written (read-only, a file in the way, ...), holds another recipe's masks
    except (OSError, PreprocessError) as error:
        print(_shown(f"error: {error}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM: every mask written is complete (atomic writes)
        what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"\n{what}: the masks written so far are kept; run the same command again to continue",
              file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        for signum, handler in previous.items():  # (the command line's process is ending after a stop)
            signal.signal(signum, signal.SIG_IGN if stop_handler.count and command_line else handler)
    print(_shown(
        f"{summary['images']} images: {summary['written']} written, {summary['skipped_existing']} already done"
        f"{' (verified)' if args.verify else ''}, "
        f"{summary['regenerated']} regenerated, {summary['failed']} failed"
        + (f" (listed in {summary['failures_file']})" if summary["failures_file"] else "")
    ))
    if not summary["failed"] or (args.allow_bad_images and summary["failed"] == summary["bad_images"]):
        return 0
    if summary["failed"] == summary["bad_images"]:
        print("(all of them images whose content cannot be decoded, which training replaces with others: "
              "--allow-bad-images makes such a run exit with status 0)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    from rmae.cli import ctrl_c_as_usual

    ctrl_c_as_usual()
    sys.exit(command())
