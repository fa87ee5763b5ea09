"""Triton kernels for the R-MAE hot paths, installed as ``rmae.kernels``.

Every public function takes ``impl="auto" | "triton" | "reference"`` (see ``_dispatch``): Triton on CUDA
tensors or under ``TRITON_INTERPRET=1``, the PyTorch reference otherwise. Each Triton path has a Triton
backward; each ``*_reference`` is plain PyTorch with autograd through PyTorch.
"""
from ._dispatch import HAS_TRITON, interpreting, set_index_checks, use_triton
from .bce import region_bce_loss, region_bce_loss_from_labels, region_bce_loss_reference
from .gather import gather_visible, gather_visible_reference
from .pool import region_query_pool, region_query_pool_reference
from .region_embed import (
    labels_to_maps,
    region_tokens,
    region_tokens_from_labels,
    region_tokens_from_labels_reference,
    region_tokens_reference,
)
from .unshuffle import unshuffle_fill, unshuffle_fill_reference

__all__ = [
    "HAS_TRITON",
    "interpreting",
    "set_index_checks",
    "use_triton",
    "gather_visible",
    "gather_visible_reference",
    "unshuffle_fill",
    "unshuffle_fill_reference",
    "region_query_pool",
    "region_query_pool_reference",
    "region_tokens",
    "region_tokens_reference",
    "region_tokens_from_labels",
    "region_tokens_from_labels_reference",
    "labels_to_maps",
    "region_bce_loss",
    "region_bce_loss_reference",
    "region_bce_loss_from_labels",
]
