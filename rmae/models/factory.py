"""Named architectures (official ``rmae_{base,large,huge}`` plus CPU-friendly tiny/small) and ``build_model``."""
from __future__ import annotations

from typing import Any

from .rmae import RMAE

# Region branch and decoder sizes of the official base recipe (RMAE/COCO/rmae_fh_4000eps.yaml). The other RMAE
# defaults are the official class's: norm_pix_loss=False there and here, the recipes' configs set it to true.
_OFFICIAL = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, region_enc_dim=128,
                 region_enc_num_heads=8, region_dec_dim=128, region_dec_num_heads=8, region_cross_layer=8)

ARCHS: dict[str, dict[str, Any]] = {
    # CPU-friendly sizes for tests and the demo (not from the paper)
    "rmae_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128,
                              decoder_depth=2, decoder_num_heads=4, region_enc_dim=64, region_enc_num_heads=4,
                              region_dec_dim=64, region_dec_num_heads=4, region_cross_layer=2),
    "rmae_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256,
                               decoder_depth=4, decoder_num_heads=8, region_enc_dim=128, region_enc_num_heads=8,
                               region_dec_dim=128, region_dec_num_heads=8, region_cross_layer=4),
    # official
    "rmae_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_OFFICIAL),
    "rmae_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_OFFICIAL),
    "rmae_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_OFFICIAL),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "mae": dict(num_region=0, use_mae_loss=True),
    "rae": dict(use_mae_loss=False),
    "rmae": dict(use_mae_loss=True),
}


def build_model(arch: str, variant: str = "rmae", **overrides: Any) -> RMAE:
    """``build_model("rmae_base_patch16", "rmae", img_size=224, num_region=8, ...)``.

    ``arch`` is a key of ``ARCHS`` (the ``rmae_`` prefix may be written ``mae_`` or left out: "base_patch16");
    ``variant`` is "mae" (k = 0), "rae" (no pixel decoder) or "rmae"; ``overrides`` are RMAE keyword arguments.
    """
    name = arch if arch.startswith("rmae_") else "rmae_" + arch.removeprefix("mae_")
    if name not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    kwargs = {**ARCHS[name], **VARIANTS[variant], **overrides}
    if variant == "mae" and kwargs.get("num_region", 0) != 0:
        raise ValueError(f"variant 'mae' has no region branch, got num_region={kwargs['num_region']}")
    if variant == "rae" and kwargs.get("use_mae_loss"):
        raise ValueError("variant 'rae' has no pixel decoder, got use_mae_loss=True")
    return RMAE(**kwargs)


def _factory(name: str):
    def make(variant: str = "rmae", **overrides: Any) -> RMAE:
        return build_model(name, variant, **overrides)

    make.__name__ = name
    make.__doc__ = f"{name}: {ARCHS[name]} (variant 'rmae' | 'rae' | 'mae'; keyword overrides go to RMAE)."
    return make


rmae_tiny_patch16 = _factory("rmae_tiny_patch16")
rmae_small_patch16 = _factory("rmae_small_patch16")
rmae_base_patch16 = _factory("rmae_base_patch16")
rmae_large_patch16 = _factory("rmae_large_patch16")
rmae_huge_patch14 = _factory("rmae_huge_patch14")
