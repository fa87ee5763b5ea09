"""``RegionDataset``: one training sample = normalised crop + compact region labels + k sampled regions.

Sample dict (source ``none`` omits the three region keys)::

    image         float32 [3, S, S]   ImageNet mean/std normalised
    region_labels int16   [Sc, S, S]  per FH scale, labels renumbered 0..n_s-1 within the crop
    region_scale  int64   [k]         scale of each sampled region
    region_id     int64   [k]         its label in region_labels[region_scale]; -1 = empty region
    index         int64   []          dataset index actually loaded (after any substitution)
    noise         float32 [N]         only with region_sample='random_fg': the masking permutation
                                      (``argsort(noise)``) the model must use, as in the original

``random_fg`` (the original's ``region_sample_type``): a permutation of the N patches is drawn here, and only
regions that cover at least one of its first ``(1 - region_mask_ratio)·N`` (visible) patches are sampled.

Randomness comes only from a generator seeded by (seed, draw) where ``draw`` is the sampler's global
draw number (or (seed, epoch, index) for a plain integer index), so batches do not depend on the
number of workers and a resumed run repeats the same crops.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from rmae import listing
from rmae.cores import usable_cores
from rmae.fh import felzenszwalb_batch, felzenszwalb_multi
from rmae.logging_utils import progress_bar
from rmae.masks import (DECODE_VERSION, MASK_SUFFIX, ORIGINAL_SUFFIX, PARAMS_FILE, REDO_KEY, MaskError, find_mask,
                        folder_params, mask_path, recorded_recipe, shared_mask_names)
from rmae.recipes import recipe_folder

from .cache import ShardCache
from .decode import CorruptImageError, decode_image, decode_labels
from .regions import region_patch_counts, regions_in_patches, relabel_crop, sample_regions
from .samplers import DRAW_STREAM, INDEX_STREAM
from .sources import FHRecipe, ImageList, MissingImageError, folder_command, missing_masks_message
from .transforms import crop_resize, nearest_indices, random_resized_crop_params, to_normalized_chw

__all__ = ["REGION_SOURCES", "RegionDataset", "MissingImageError", "MissingMaskError", "MaskRecipeError"]

REGION_SOURCES = ("offline", "online", "online_crop", "none")
_MAX_WORKER_SLOTS = 256


# Images without a mask that the start-up check decodes at once to tell undecodable ones (replaced while training)
# from missing masks; with more, it goes on a batch at a time until a batch holds a decodable image (a mask is then
# certainly missing: an unfinished preprocessing run stops at its first batch)
DECODE_CHECK_BATCH = 64


class MissingMaskError(FileNotFoundError):
    """An image without its FH mask file while regions='offline'."""


def _is_mask_name(name: str) -> bool:
    """Ours (``.npy.zst``) or the original's (``.npy``)."""
    return name.endswith((MASK_SUFFIX, ORIGINAL_SUFFIX))


class MaskRecipeError(MissingMaskError):
    """A mask folder that records (``PARAMS_FILE``) another number of FH scales than the dataset's recipe: the
    masks this dataset needs are not there."""


class RegionDataset(Dataset):
    """Images of an ``ImageList`` with FH regions from ``regions`` ∈ REGION_SOURCES.

    ``offline``: mask files (ours ``.npy.zst`` or the original's ``.npy``; the sample set computes its
    masks once in memory). ``online``: C++ FH on the original image in the worker (recipe scales).
    ``online_crop``: FH on the resized crop (much cheaper; regions follow the crop's pixels).
    ``none``: plain MAE, no region keys.
    """

    def __init__(
        self,
        images: ImageList,
        regions: str = "offline",
        *,
        train: bool = True,
        img_size: int = 224,
        num_regions: int = 8,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        label_resize: str = "center",
        min_region_patches: int = 0,
        patch_size: int = 16,
        region_sample: str = "random",
        region_mask_ratio: float = 0.75,
        fh: FHRecipe | None = None,
        seed: int = 0,
        max_retries: int = 10,
        cache: ShardCache | None = None,
    ):
        if regions not in REGION_SOURCES:
            raise ValueError(f"regions must be one of {REGION_SOURCES}, got {regions!r}")
        if label_resize not in ("center", "floor"):
            raise ValueError(f"label_resize must be 'center' or 'floor', got {label_resize!r}")
        if region_sample not in ("random", "random_fg"):
            raise ValueError(f"region_sample must be 'random' or 'random_fg', got {region_sample!r}")
        if img_size <= 0 or num_regions < 0:
            raise ValueError(f"img_size must be > 0 and num_regions >= 0, got {img_size}, {num_regions}")
        self.images = images
        self.regions = regions
        self.train = train
        self.img_size = int(img_size)
        self.num_regions = int(num_regions)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = float(hflip)
        self.label_resize = label_resize
        self.min_region_patches = int(min_region_patches)
        self.patch_size = int(patch_size)
        self.region_sample = region_sample
        self.region_mask_ratio = float(region_mask_ratio)
        self.fh = fh or images.recipe
        self.seed = int(seed)
        self.epoch = 0
        self.max_retries = int(max_retries)
        # the images an unreadable one is replaced with (None: any): a rank's shard under sampler=shard, whose
        # images its cache holds (and which no other rank reads)
        self.replacements: np.ndarray | None = None
        self.cache = cache
        self._errors = torch.zeros(_MAX_WORKER_SLOTS, dtype=torch.int64).share_memory_()
        self._decodings: dict[Path, int] = {}  # mask folder -> its DECODE_VERSION, read at its first wide image
        # one warning per unreadable image for the whole run: a bit per image (160 KB for ImageNet-1k) in memory
        # shared by the loader's workers and the main process (which reads the pictures' samples)
        self._warned = torch.zeros((len(images) + 7) // 8, dtype=torch.uint8).share_memory_()
        self._memory_labels = self._fh_of_arrays() if regions == "offline" and images.arrays is not None else None
        if regions == "offline" and images.arrays is None:
            missing = [i for i, (_, mask_dir) in enumerate(images.roots) if not mask_dir.is_dir()]
            if missing:
                raise MissingMaskError(missing_masks_message(images, missing))
            # (root, image path without its suffix): what names each image's mask on the usual names, as bytes (a
            # key that misses is confirmed with mask_path / find_mask themselves)
            keys = list(zip(images.root_ids.tolist(), (p.rpartition(b".")[0] or p for p in images.paths.tolist())))
            self._check_shared_mask_names(keys)
            self._check_recipes()
            self._check_masks_present(keys)

    def _check_masks_present(self, keys: list[tuple[int, bytes]]) -> None:
        """Every image has a mask file (ours or the original's), from one listing of each mask folder: else
        MissingMaskError before any sample is read (a run stopped at the first image without one it drew, hours in
        and again after every resume: an unfinished preprocessing run, images added since)."""
        present: set[tuple[int, bytes]] = set()
        for root, (_, mask_dir) in enumerate(self.images.roots):  # (an unlistable folder: looked up below)
            for name in listing.scan_files(mask_dir, _is_mask_name, 16).images:
                suffix = MASK_SUFFIX if name.endswith(MASK_SUFFIX) else ORIGINAL_SUFFIX
                present.add((root, os.fsencode(name[: -len(suffix)])))
        # not in the listing: looked up as the loader does (names the listing spells otherwise, "./x.jpg", a folder
        # it could not list)
        missing = [i for i, key in enumerate(keys) if key not in present
                   and find_mask(self.images.mask_dir(i), self.images.relative(i)) is None]
        # Images whose content cannot be decoded have no mask (preprocessing lists them and goes on) and are
        # replaced by others while training, as any unreadable image: they are decoded here to tell them apart
        bad = self._undecodable_among(missing)
        if bad:
            shown = ", ".join(str(self.images.image_file(i)) for i in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            warnings.warn(f"{len(bad)} image(s) of {self.images.name} cannot be decoded and have no FH mask: "
                          f"{shown}{more}; training replaces each with another image (counted in data_errors)",
                          RuntimeWarning, stacklevel=3)
            missing = sorted(set(missing) - set(bad))
        if missing:
            shown = ", ".join(str(mask_path(self.images.mask_dir(i), self.images.relative(i))) for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise MissingMaskError(
                f"{len(missing)} of the {len(keys)} images of {self.images.name} have no FH mask: {shown}{more} "
                f"(an unfinished preprocessing run, or images added since). Make them with: "
                f"{self.images.preprocess_hint} (it skips the masks already made), or use regions='online' / "
                "'online_crop'.")

    def _undecodable_among(self, missing: list[int]) -> list[int]:
        """The images of ``missing`` (no mask) whose content cannot be decoded: all of them are decoded when there are
        at most DECODE_CHECK_BATCH, else batch after batch (on threads, with a progress bar) until a batch holds a
        decodable image, the rest then left unchecked."""
        bad: list[int] = []
        batches = range(0, len(missing), DECODE_CHECK_BATCH)
        with ThreadPoolExecutor(min(8, usable_cores())) as pool, \
                progress_bar(len(missing), 0, len(batches) > 1, "checking images without a mask", "img") as bar:
            for start in batches:
                batch = missing[start:start + DECODE_CHECK_BATCH]
                undecodable = list(pool.map(self._undecodable, batch))
                bad += [i for i, flag in zip(batch, undecodable) if flag]
                bar.update(len(batch))
                if not all(undecodable):
                    break
        return bad

    def _undecodable(self, index: int) -> bool:
        """Whether image ``index`` exists but its content cannot be decoded."""
        try:
            self._read_image(index)
        except CorruptImageError as error:  # (content: the bytes are there but are no image; else a read error)
            return bool(error.content)
        except OSError:  # missing (MissingImageError): no bad content to replace, the mask is what is missing
            return False
        return False

    def _check_shared_mask_names(self, keys: list[tuple[int, bytes]]) -> None:
        """Two images of one folder whose names differ only in the suffix (``x.jpg``, ``x.png``) would read one mask
        file, made from at most one of them: MissingMaskError naming them (preprocessing segments neither)."""
        if len(set(keys)) == len(keys):
            return
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        shared = []
        for group in (g for g in groups.values() if len(g) > 1):  # (one root each) confirmed by the mask names
            # (a name an annotation file lists twice is one image)
            names = sorted({os.path.normpath(self.images.relative(i)) for i in group})
            shared += [f"{self.images.roots[self.images.root_ids[group[0]]][0]}: " + " and ".join(same)
                       for same in shared_mask_names(names).values()]
        if not shared:
            return
        shown = "; ".join(shared[:5])
        more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
        raise MissingMaskError(
            f"{len(shared)} group(s) of images share one mask file name, so no mask can tell them apart "
            f"(preprocessing segments none of them): {shown}{more}. Rename one of each, then run: "
            f"{self.images.preprocess_hint}; or use regions='online' / 'online_crop'.")

    def _check_recipes(self) -> None:
        """The recipe each mask folder records against this dataset's: another number of scales cannot be
        stacked into a batch (MaskRecipeError, before any sample is read, naming the fixes); the same number
        with other scales, min sizes or sigma (masks made on purpose with other FH parameters) is a warning."""
        wanted, fixes, mask_folders = self.fh, [], []
        for root, (image_dir, mask_dir) in enumerate(self.images.roots):
            params = folder_params(mask_dir)
            found = recorded_recipe(params)
            mask_folders.append(str(mask_dir.resolve()))
            if found is not None and REDO_KEY in params:  # run again, the redo resumes (no --overwrite)
                finish = self.images.root_command(root, found)
                raise MaskRecipeError(
                    f"mask folder {mask_dir}: an --overwrite run to it (FH recipe {found.describe()}) did not finish, "
                    f"so its masks are a mix of that recipe and the one before. Finish it with:\n    {finish}")
            if found is None or found == wanted:
                continue
            if len(found.scales) == len(wanted.scales):
                warnings.warn(f"mask folder {mask_dir} records the FH recipe {found.describe()} ({PARAMS_FILE}), not "
                              f"this dataset's {wanted.describe()}: its masks are used as they are", stacklevel=3)
                continue
            own = recipe_folder(mask_dir, wanted)
            mask_folders[-1] = str(own.resolve())
            fixes.append((mask_dir, found, folder_command(image_dir, own, wanted),
                          self.images.root_command(root, wanted) + " --overwrite"))
        if fixes:
            lines = [f"mask folder {mask_dir} holds masks of the FH recipe {found.describe()} ({PARAMS_FILE}), but "
                     f"this dataset is trained with {wanted.describe()}" for mask_dir, found, _, _ in fixes]
            raise MaskRecipeError(
                "\n".join(lines) + ".\nMake this recipe's masks in a folder of their own:\n    "
                + " && ".join(own for _, _, own, _ in fixes)
                + f"\nand train with image_folder=[{','.join(str(i.resolve()) for i, _ in self.images.roots)}] "
                f"mask_folder=[{','.join(mask_folders)}];\nor recompute the folder in place "
                "(its masks of the other recipe are replaced):\n    " + " && ".join(o for *_, o in fixes)
                + "\nor compute regions in the loader with regions='online' (FH on the full image) or 'online_crop'.")

    def _fh_of_arrays(self) -> list[np.ndarray]:
        """FH labels of the in-memory images for this dataset's recipe. The list keeps those of its own recipe
        (computed once, shared by its datasets); another recipe's are computed for this dataset alone."""
        images, fh = self.images, self.fh
        if fh == images.recipe and images.labels is not None:
            return images.labels
        labels = felzenszwalb_batch(images.arrays, fh.scales, fh.sigma, fh.min_sizes)
        if fh == images.recipe:
            images.labels = labels
        return labels

    # ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Epoch mixed into the seed of plain integer indices (sampler keys carry their own draw number). It reaches
        only this copy of the dataset: a DataLoader's persistent workers keep the epoch they were started with, so
        give them (index, draw) keys (``rmae.data.build_loader`` does) for new augmentations every epoch."""
        self.epoch = int(epoch)

    @property
    def error_count(self) -> int:
        """Corrupt images and unreadable masks skipped so far, summed over all loader workers."""
        return int(self._errors.sum())

    def _rng(self, key) -> tuple[int, np.random.Generator]:
        if isinstance(key, (tuple, list)):
            index, draw = int(key[0]), int(key[1])
            return index, np.random.default_rng([self.seed, DRAW_STREAM, draw])
        index = int(key)
        return index, np.random.default_rng([self.seed, INDEX_STREAM, self.epoch, index])

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, rng = self._rng(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        last_error = None
        for replaced in range(self.max_retries):
            try:
                sample = self._load(index, rng)
            except (CorruptImageError, MaskError) as error:
                self._skip(error, index)
                pool = self.replacements
                index = int(rng.integers(len(self))) if pool is None else int(pool[rng.integers(len(pool))])
                last_error = error
                continue
            # the unreadable images skipped for this sample: counted with the batch it reaches (a worker's shared
            # count also holds the batches it has read ahead)
            sample["replaced"] = torch.tensor(replaced, dtype=torch.int64)
            return sample
        raise ValueError(  # (a data error: training stops with this message, exit status 2)
            f"{self.max_retries} consecutive unreadable samples in {self.images.name}, the last: {last_error}. "
            "Check the dataset files."
        )

    def _skip(self, error: Exception, index: int) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_MAX_WORKER_SLOTS - 1)
        self._errors[slot] += 1
        if not self.warned(index):
            byte, bit = divmod(index, 8)
            self._warned[byte] = int(self._warned[byte]) | (1 << bit)
            # (an explicit location: the caller is the DataLoader's fetch code, of no use to the reader)
            warnings.warn_explicit(f"skipping sample: {error}", RuntimeWarning, "rmae.data", 0)

    def warned(self, index: int) -> bool:
        """Whether the image ``index`` was reported unreadable in this run (by any worker)."""
        byte, bit = divmod(index, 8)
        return bool(int(self._warned[byte]) >> bit & 1)

    # ----------------------------------------------------------------------------------------------
    def _read_image(self, index: int) -> Image.Image:
        if self.images.arrays is not None:
            return Image.fromarray(self.images.arrays[index])
        path = self.images.image_file(index)
        data = self.cache.image(index) if self.cache is not None else None
        try:
            return decode_image(data if data is not None else path, path)
        except CorruptImageError:
            if data is None and not path.exists():
                image_dir = self.images.roots[self.images.root_ids[index]][0]
                raise MissingImageError(
                    f"image {path} is listed but does not exist: the image folder {image_dir} is incomplete "
                    "(a partial download or extraction?). Restore the file, or remove it from the annotation file."
                ) from None
            raise

    def _read_labels(self, index: int, image_size: tuple[int, int]) -> tuple[np.ndarray, Path | str | None]:
        """The label maps [S, H, W] of image ``index`` and the mask file they came from (None: in memory)."""
        found = None
        if self._memory_labels is not None:
            labels = self._memory_labels[index]
        else:
            cached = self.cache.mask(index) if self.cache is not None else None
            if cached is not None:
                labels = decode_labels(cached[0], cached[1])
                found = cached[1]
            else:
                found = find_mask(self.images.mask_dir(index), self.images.relative(index))
                if found is None:
                    raise MissingMaskError(self._missing_mask_message(index))
                labels = decode_labels(found, found)
            self._check_scales(labels, found, index)
            width, height = image_size
            if labels.shape[1:] != (height, width):
                raise MaskError(
                    f"mask {found} is {labels.shape[2]}x{labels.shape[1]} (WxH) but image "
                    f"{self.images.image_file(index)} is {width}x{height}: the mask was made from another image. "
                    f"Remake it with: {self.images.command(index)} --verify"
                )
        return labels, found

    def _check_decoding(self, index: int, mask, mode: str) -> None:
        """A 16/32-bit or float image's mask from a folder of an older decoding (rmae before DECODE_VERSION 2,
        or the original, which clipped such images to white before FH) does not match the pixels: MaskError."""
        mask_dir = self.images.mask_dir(index)
        if mask_dir not in self._decodings:
            try:  # no record (the original's masks): the clipping decoding
                self._decodings[mask_dir] = int(folder_params(mask_dir).get("decode", 1))
            except (ValueError, TypeError):
                self._decodings[mask_dir] = 1
        if self._decodings[mask_dir] < DECODE_VERSION:
            raise MaskError(f"mask {mask} was made from the clipped pixels of {mode} image "
                            f"{self.images.image_file(index)} (an older rmae or the original code); run "
                            f"{self.images.preprocess_hint} again: it remakes the masks of such images")

    def _missing_mask_message(self, index: int) -> str:
        image_file = self.images.image_file(index)
        expected = mask_path(self.images.mask_dir(index), self.images.relative(index))
        return (f"no FH mask for {image_file}: expected {expected} (or the original's .npy beside it). "
                f"Make masks with: {self.images.preprocess_hint}, or use regions='online' / 'online_crop'.")

    def _check_scales(self, labels: np.ndarray, found, index: int) -> None:
        """A mask must hold one label map per scale of the recipe (a batch stacks them)."""
        expected = len(self.fh.scales)
        if labels.shape[0] != expected:
            scales = ", ".join(f"{s:g}" for s in self.fh.scales)
            raise MaskError(
                f"mask {found} holds {labels.shape[0]} FH scale(s) but the recipe has {expected} ({scales}): "
                f"it was made with another recipe. Regenerate the bad masks with: {self.images.command(index)} "
                "--verify (or --overwrite to recompute them all), or use regions='online' / 'online_crop'."
            )

    def _load(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        image = self._read_image(index)
        width, height = image.size
        size = self.img_size
        if self.train:
            box = random_resized_crop_params(rng, height, width, self.scale, self.ratio)
            flip = bool(rng.random() < self.hflip)
        else:
            box, flip = (0, 0, height, width), False
        labels, label_source = None, None
        if self.regions == "offline":
            labels, label_source = self._read_labels(index, image.size)
            if "rmae_wide" in image.info and label_source is not None:
                self._check_decoding(index, label_source, image.info["rmae_wide"])
        elif self.regions == "online":
            labels = felzenszwalb_multi(np.asarray(image), self.fh.scales, self.fh.sigma, self.fh.min_sizes)

        rgb = np.asarray(crop_resize(image, box, size))
        sample = {"image": torch.from_numpy(to_normalized_chw(rgb, flip))}
        if self.regions != "none":
            if self.regions == "online_crop":
                crop = np.ascontiguousarray(rgb[:, ::-1]) if flip else rgb
                labels = felzenszwalb_multi(crop, self.fh.scales, self.fh.sigma, self.fh.min_sizes)
                # FH numbers segments 0..n-1 in raster order of first pixel: already the compact form.
                compact = labels.astype(np.int16)
                counts = labels.reshape(labels.shape[0], -1).max(axis=1).astype(np.int64) + 1
                if counts.max() > 32768:
                    raise ValueError("a crop holds more than 32768 FH segments at one scale; int16 cannot hold them")
            else:
                i, j, h, w = box
                ys = nearest_indices(i, h, size, self.label_resize)
                xs = nearest_indices(j, w, size, self.label_resize)
                if flip:
                    xs = np.ascontiguousarray(xs[::-1])
                try:
                    compact, counts = relabel_crop(labels, ys, xs)
                except ValueError as error:  # labels out of range, too many segments: name the file
                    message = (f"mask {label_source or 'of ' + str(self.images.image_file(index))}: {error}; FH masks "
                               "hold labels 0..n-1 (rmae.preprocess --verify checks them)")
                    if label_source is None:  # labels computed here, not read from a file: no file to replace
                        raise ValueError(message) from None
                    raise MaskError(message) from None
            keep = None
            if self.min_region_patches > 1:
                keep = region_patch_counts(compact, counts, self.patch_size) >= self.min_region_patches
            if self.region_sample == "random_fg":
                num_patches = (size // self.patch_size) ** 2
                shuffle = rng.permutation(num_patches)
                visible = regions_in_patches(compact, counts, self.patch_size,
                                             shuffle[: int((1 - self.region_mask_ratio) * num_patches)])
                keep = visible if keep is None else keep & visible
                noise = np.empty(num_patches, dtype=np.float32)
                noise[shuffle] = np.arange(num_patches, dtype=np.float32)  # argsort(noise) == shuffle
                sample["noise"] = torch.from_numpy(noise)
            region_scale, region_id = sample_regions(counts, self.num_regions, rng, keep)
            sample["region_labels"] = torch.from_numpy(compact)
            sample["region_scale"] = torch.from_numpy(region_scale)
            sample["region_id"] = torch.from_numpy(region_id)
        sample["index"] = torch.tensor(index, dtype=torch.int64)
        return sample
