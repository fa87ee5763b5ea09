"""R-MAE data pipeline: image lists, joint crop/flip of images and FH labels, region sampling, loaders.

    from rmae.data import build_loader, DataConfig
    loader = build_loader(DataConfig(dataset="coco", split="train2017", regions="offline"),
                          batch_size=64, num_workers=8, rank=rank, world_size=world, seed=0, start=0)
    batch = next(iter(loader))  # image [B,3,224,224] f32, region_labels [B,Sc,224,224] i16,
                                # region_scale / region_id [B,k] i64 (-1 = empty), index [B] i64
"""
from .cache import ShardCache
from .dataset import REGION_SOURCES, MaskRecipeError, MissingImageError, MissingMaskError, RegionDataset
from .decode import CorruptImageError, decode_image, decode_labels
from .loader import DataConfig, build_dataset, build_loader
from .regions import (
    reference_regions,
    region_maps,
    region_patch_counts,
    regions_in_patches,
    relabel_crop,
    sample_regions,
)
from .samplers import InfiniteSampler, SequentialShardSampler, ShardSampler, shard_indices
from .sources import (
    COCO_FH,
    IMAGENET_FH,
    DatasetNotFoundError,
    FHRecipe,
    ImageList,
    coco,
    dataset_root,
    imagenet,
    open_folders,
    open_image_list,
    read_coco_file_names,
    sample,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_resize,
    nearest_indices,
    random_resized_crop_params,
    to_normalized_chw,
)

__all__ = [
    "build_loader", "build_dataset", "DataConfig", "RegionDataset", "REGION_SOURCES", "MissingImageError",
    "MissingMaskError", "MaskRecipeError",
    "ShardCache", "InfiniteSampler", "ShardSampler", "SequentialShardSampler", "shard_indices",
    "CorruptImageError", "decode_image", "decode_labels", "region_maps", "reference_regions",
    "region_patch_counts", "regions_in_patches", "relabel_crop", "sample_regions",
    "COCO_FH", "IMAGENET_FH", "DatasetNotFoundError", "FHRecipe", "ImageList", "coco", "imagenet", "sample",
    "dataset_root", "open_folders", "open_image_list", "read_coco_file_names", "IMAGENET_MEAN", "IMAGENET_STD",
    "crop_resize", "nearest_indices", "random_resized_crop_params", "to_normalized_chw",
]
