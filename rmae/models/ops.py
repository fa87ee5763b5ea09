"""The model's fused steps, each served by ``rmae.kernels`` (``impl="auto"|"triton"|"reference"``).

TEMPORARY SHIMS: until a function lands in ``rmae.kernels``, a plain-PyTorch stand-in below is used for
``impl`` "auto"/"reference" ("triton" raises). Delete each shim once its kernel exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from rmae import kernels as _kernels
except ImportError:  # pragma: no cover - package always ships rmae.kernels
    _kernels = None


def _no_triton(name: str, impl: str) -> None:
    if impl == "triton":
        raise NotImplementedError(f"rmae.kernels.{name} has not landed yet; use kernel_impl='reference' or 'auto'")


# ---------------------------------------------------------------- temporary shims (plain PyTorch)
def _gather_visible(x, ids_keep, regions=None, impl="auto"):
    _no_triton("gather_visible", impl)
    x_vis = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    r_vis = None
    if regions is not None:
        B, k, _, C = regions.shape
        idx = ids_keep.view(B, 1, -1, 1).expand(B, k, -1, C)
        r_vis = torch.gather(regions, 2, idx)
    return x_vis, r_vis


def _unshuffle_fill(x, mask_token, ids_restore, pos_embed, impl="auto"):
    _no_triton("unshuffle_fill", impl)
    B, N = ids_restore.shape
    C = x.shape[-1]
    mask_tokens = mask_token.expand(B, N + 1 - x.shape[1], -1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, C))
    return torch.cat([x[:, :1, :], x_], dim=1) + pos_embed


def _region_query_pool(x, residual=None, impl="auto"):
    _no_triton("region_query_pool", impl)
    if residual is not None:
        x = x + residual
    return x.mean(dim=2)


def _region_tokens(maps, ids_keep, weight, bias, pos_embed, patch_size, impl="auto"):
    _no_triton("region_tokens", impl)
    B, k, H, W = maps.shape
    D = weight.shape[0]
    r = maps.reshape(B * k, 1, H, W).to(weight.dtype) - 0.5
    t = F.conv2d(r, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)  # [B*k, N, D]
    t = (t + pos_embed).view(B, k, -1, D)
    idx = ids_keep.view(B, 1, -1, 1).expand(B, k, -1, D)
    return torch.gather(t, 2, idx)


def _region_tokens_from_labels(labels, scale_index, label_id, ids_keep, weight, bias, pos_embed, patch_size,
                               impl="auto"):
    _no_triton("region_tokens_from_labels", impl)
    from .regions import labels_to_maps

    maps = labels_to_maps(labels, scale_index, label_id)
    return _region_tokens(maps, ids_keep, weight, bias, pos_embed, patch_size, impl=impl)


def _pick(name, shim):
    fn = getattr(_kernels, name, None) if _kernels is not None else None
    return fn if fn is not None else shim


gather_visible = _pick("gather_visible", _gather_visible)
unshuffle_fill = _pick("unshuffle_fill", _unshuffle_fill)
region_query_pool = _pick("region_query_pool", _region_query_pool)
region_tokens = _pick("region_tokens", _region_tokens)
region_tokens_from_labels = _pick("region_tokens_from_labels", _region_tokens_from_labels)


def landed() -> dict[str, bool]:
    """Which steps run through ``rmae.kernels`` (True) versus a temporary shim here (False)."""
    names = ["gather_visible", "unshuffle_fill", "region_query_pool", "region_tokens", "region_tokens_from_labels"]
    return {n: _kernels is not None and hasattr(_kernels, n) for n in names}
