"""R-MAE models: ``RMAE`` (MAE / RAE / R-MAE variants), factories, timm-compatible encoder export."""
import warnings

from .export import export_encoder, load_checkpoint, save_encoder
from .factory import (ARCHS, build_model, rmae_base_patch16, rmae_huge_patch14, rmae_large_patch16,
                      rmae_small_patch16, rmae_tiny_patch16)
from .regions import RegionLabels
from .rmae import RMAE, RMAEOutput
from .vit import Block, PatchEmbed, VisionTransformer, get_2d_sincos_pos_embed

__all__ = [
    "RMAE", "RMAEOutput", "RegionLabels", "build_model", "ARCHS", "export_encoder", "save_encoder", "load_checkpoint",
    "rmae_tiny_patch16", "rmae_small_patch16", "rmae_base_patch16", "rmae_large_patch16", "rmae_huge_patch14",
    "VisionTransformer", "Block", "PatchEmbed", "get_2d_sincos_pos_embed",
]

# `python -m rmae.models.export` (the export command's first name) runs a module this package has imported: runpy's
# warning about that (given after this package is imported) says nothing to the user
warnings.filterwarnings("ignore", message=r"'rmae\.models\.export' found in sys\.modules", category=RuntimeWarning)
