"""``build_dataset`` / ``build_loader``: what the trainer calls."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from rmae.cores import usable_cores

from .cache import ShardCache
from .dataset import RegionDataset
from .samplers import InfiniteSampler, SequentialShardSampler, ShardSampler
from .sources import open_folders, open_image_list

__all__ = ["DataConfig", "build_dataset", "build_loader"]

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Dataset options (the original's ``dataset_config`` in our names)."""

    dataset: str = "sample"  # coco | coco++ | imagenet | imnet | sample
    split: str | None = None  # coco: train2017 | val2017 | unlabeled2017 | coco++; imagenet: train | val
    root: str | None = None  # default $E2E_DATASETS, else .data
    # Or the folders themselves (the original's imdb_files keys; instead of split): relative to <root>/coco/ or
    # <root>/imagenet/ (else imnet/), absolute as they are. mask_folder and anno_file pair up with image_folder;
    # null: fh_<name> beside each image folder, and each folder's listing.
    image_folder: str | list | None = None
    mask_folder: str | list | None = None
    anno_file: str | list | None = None
    regions: str = "offline"  # offline | online | online_crop | none
    train: bool = True  # RandomResizedCrop + flip; False: plain resize
    img_size: int = 224
    num_regions: int = 8
    sampler: str = "infinite"  # infinite | shard (endless) | sequential (one ordered pass over the rank's shard)
    cache_bytes: int = 8 << 30  # shard mode: per-rank bound on cached encoded bytes
    label_resize: str = "center"  # center (aligned with the image) | floor (the original's torch nearest)
    min_region_patches: int = 0  # >= 2 reproduces filter_small_patches
    patch_size: int = 16
    region_sample: str = "random"  # random | random_fg (the original's region_sample_type; adds "noise")
    region_mask_ratio: float = 0.75  # random_fg: visible patches = first (1 - ratio)·N of the permutation
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)

    @classmethod
    def from_any(cls, cfg: "DataConfig | Mapping[str, Any] | str | None") -> "DataConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, str):
            return cls(dataset=cfg)
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown data options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(cfg))


def _image_list(cfg: DataConfig):
    """The configured images: ``image_folder`` (with its mask folders and annotation files) or ``split``."""
    if cfg.image_folder is None:
        if cfg.mask_folder is not None or cfg.anno_file is not None:
            raise ValueError("mask_folder and anno_file pair up with image_folder, which is not set")
        return open_image_list(cfg.dataset, cfg.split, cfg.root)
    if cfg.split is not None:
        raise ValueError(f"set split ({cfg.split!r}) or image_folder ({cfg.image_folder!r}), not both")
    return open_folders(cfg.dataset, cfg.image_folder, cfg.mask_folder, cfg.anno_file, cfg.root)


def build_dataset(cfg=None, seed: int = 0, cache: ShardCache | None = None) -> RegionDataset:
    cfg = DataConfig.from_any(cfg)
    images = _image_list(cfg)
    return RegionDataset(
        images, cfg.regions, train=cfg.train, img_size=cfg.img_size, num_regions=cfg.num_regions,
        scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), label_resize=cfg.label_resize,
        min_region_patches=cfg.min_region_patches, patch_size=cfg.patch_size, region_sample=cfg.region_sample,
        region_mask_ratio=cfg.region_mask_ratio, seed=seed, cache=cache,
    )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def build_loader(
    cfg=None,
    batch_size: int = 64,
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start: int = 0,
    *,
    pin_memory: bool | None = None,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader of per-rank batches (``batch_size`` is per rank), endless unless sampler='sequential'.

    ``start``: per-rank samples already consumed (steps × batch_size) to resume exactly. The sampler is
    ``loader.sampler`` (state_dict / load_state_dict), the dataset ``loader.dataset`` (``error_count``,
    ``cache``). Shard mode fills the rank's byte cache here, before the workers fork.
    """
    cfg = DataConfig.from_any(cfg)
    if num_workers is None:
        num_workers = min(8, usable_cores())
    dataset = build_dataset(cfg, seed=seed)
    if cfg.sampler == "infinite":
        sampler = InfiniteSampler(len(dataset), rank, world_size, seed, shuffle=cfg.train, start=start)
    elif cfg.sampler == "shard":
        sampler = ShardSampler(len(dataset), rank, world_size, seed, shuffle=cfg.train, start=start)
        dataset.replacements = sampler.indices
        if dataset.images.arrays is None:
            dataset.cache = ShardCache(dataset.images, sampler.indices, cfg.cache_bytes,
                                       masks=cfg.regions == "offline")
            log.info("rank %d %s", rank, dataset.cache.report())
    elif cfg.sampler == "sequential":
        sampler = SequentialShardSampler(len(dataset), rank, world_size)
    else:
        raise ValueError(f"sampler must be 'infinite', 'shard' or 'sequential', got {cfg.sampler!r}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    # fork: workers share the image list, the sample set's arrays and the shard cache instead of each unpickling a
    # copy (Python 3.14 makes forkserver the default on Linux).
    context = "fork" if num_workers > 0 and sys.platform.startswith("linux") else None
    return DataLoader(
        dataset,
        multiprocessing_context=context,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=cfg.sampler != "sequential",
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
