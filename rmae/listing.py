"""Which image files a folder holds: the one listing that preprocessing and the data pipeline share, so
every image the loader reads is one that preprocessing segments, and no other."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rmae.image_io import IMAGE_SUFFIXES

__all__ = ["ImageScan", "scan_images", "scan_files"]


@dataclass
class ImageScan:
    """What a folder holds, as paths relative to it (``os.sep``-joined, sorted as strings).

    File names that are not valid in the file system encoding stay as Python gives them (surrogate
    escapes); ``os.fsencode`` turns them back into their bytes.
    """

    images: list[str] = field(default_factory=list)  # (from scan_files: the files its ``keep`` accepts)
    broken_links: list[str] = field(default_factory=list)  # named like them, pointing nowhere
    unlistable: list[tuple[str, str]] = field(default_factory=list)  # (folder, why it cannot be listed)

    def extend(self, other: "ImageScan") -> None:
        self.images += other.images
        self.broken_links += other.broken_links
        self.unlistable += other.unlistable


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _list_folder(folder: Path, relative: str, above: frozenset, scan: ImageScan,
                 keep: Callable[[str], bool]) -> tuple[list[str], frozenset]:
    """Adds the files ``keep`` accepts and broken links so named directly in ``folder / relative`` to ``scan``;
    returns its subfolders (relative to ``folder``) and the identities of the folders they sit in. ``above`` holds the
    (device, inode) of the folders above it: a link back into them is not listed again."""
    try:
        info = os.stat(os.path.join(folder, relative))
        here = (info.st_dev, info.st_ino)
        if here in above:
            return [], above
        with os.scandir(os.path.join(folder, relative)) as listing:
            entries = list(listing)
    except OSError as error:
        scan.unlistable.append((relative or ".", f"cannot list folder ({error.strerror or error})"))
        return [], above
    subfolders = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        name = os.path.join(relative, entry.name) if relative else entry.name
        try:
            is_dir = entry.is_dir()  # follows symlinked folders
            is_file = not is_dir and entry.is_file()
        except OSError as error:  # a link loop, a link into a folder that cannot be read
            if keep(entry.name):
                scan.broken_links.append(name)
            elif error.errno != errno.ELOOP:  # (a looping link that is no image is no folder either)
                scan.unlistable.append((name, f"cannot follow link ({error.strerror or error})"))
            continue
        if is_dir:
            subfolders.append(name)
        elif keep(entry.name):
            if is_file:
                scan.images.append(name)
            elif entry.is_symlink():
                scan.broken_links.append(name)
    return subfolders, above | {here}


def _scan_tree(folder: Path, start: str, above: frozenset, keep: Callable[[str], bool]) -> ImageScan:
    """Everything below ``folder / start`` (itself included)."""
    scan = ImageScan()
    pending = [(start, above)]
    while pending:
        relative, above = pending.pop()
        subfolders, inside = _list_folder(folder, relative, above, scan, keep)
        pending += [(sub, inside) for sub in subfolders]
    return scan


def scan_images(folder: str | os.PathLike, num_threads: int = 1) -> ImageScan:
    """Image files under ``folder``, recursively, following symlinked folders (except a link back into its
    own ancestry); hidden files and folders are skipped.

    The top level's subfolders (ImageNet's 1000 classes) are listed on ``num_threads`` threads: on network
    file systems listing is latency-bound.
    """
    return scan_files(folder, _is_image_name, num_threads)


def scan_files(folder: str | os.PathLike, keep: Callable[[str], bool], num_threads: int = 1) -> ImageScan:
    """``scan_images`` for the files whose (non-hidden) names ``keep`` accepts, e.g. a mask folder's masks."""
    folder = Path(folder)
    scan = ImageScan()
    subfolders, above = _list_folder(folder, "", frozenset(), scan, keep)
    workers = max(1, min(num_threads, len(subfolders)))
    if workers == 1:
        parts = [_scan_tree(folder, sub, above, keep) for sub in subfolders]
    else:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda sub: _scan_tree(folder, sub, above, keep), subfolders))
    for part in parts:
        scan.extend(part)
    scan.images.sort()
    scan.broken_links.sort()
    scan.unlistable.sort()
    return scan
