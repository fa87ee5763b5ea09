"""``region_bce_loss``: the region loss, with the targets read straight from the uint8 maps (or label maps).

Reference (the model's region loss)::

    target = patchify(maps).float()                           # [B, k, N, p*p], never built here
    loss = binary_cross_entropy_with_logits(logits, target, reduction="none")
    if bg_weight != 1: loss = loss * where(target == 0, bg_weight, target)
    loss = loss.mean(-1).mean(1)                              # pixels, then regions -> [B, N]
    return (loss * region_mask).sum() / region_mask.sum()

This is the tail of the brief's stretch item (``region_expand_bce``); the expansion + LayerNorm + MLP +
prediction head is *not* fused (see the package README lines) — the logits [B, k, N, p*p] still come
from the plain PyTorch decoder. What this kernel saves: the float target tensor, the elementwise loss
tensor and their reductions; the backward writes d(logits) in one pass, recomputing the targets.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from ._dispatch import (
    HAS_TRITON,
    check_binary_maps,
    check_float,
    check_index_values,
    check_ndim,
    check_same_device,
    new_empty,
    on_tensor_device,
    next_pow2,
    opaque_to_compile,
    pick_configs,
    use_triton,
)
from .region_embed import MAP_DTYPES, check_label_regions, labels_to_maps

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .region_embed import _patch_rows, _patch_tile

__all__ = ["region_bce_loss", "region_bce_loss_reference", "region_bce_loss_from_labels"]


def patchify_maps(maps, patch_size):
    """[B, k, H, W] -> [B, k, N, p*p] float32 (row-major patches, row-major pixels inside a patch)."""
    p = patch_size
    B, k, H, W = maps.shape
    x = maps.reshape(B, k, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(B, k, (H // p) * (W // p), p * p).to(torch.float32)


def region_bce_loss_reference(logits, maps, region_mask, patch_size, bg_weight=1.0):
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, float64 for float64 logits
    target = patchify_maps(maps, patch_size).to(dtype)
    loss = F.binary_cross_entropy_with_logits(logits.to(dtype), target, reduction="none")
    if bg_weight != 1.0:
        loss = loss * torch.where(target == 0, bg_weight, torch.ones_like(target))  # background weighted, region 1
    loss = loss.mean(dim=-1).mean(dim=1)
    return (loss * region_mask).sum() / region_mask.sum()


if HAS_TRITON:

    # BLOCK_M is fixed by the launcher (it sizes the forward's per-program partial sums)
    _BLOCK_M = 16
    _CONFIGS = [
        triton.Config({}, num_warps=4),
        triton.Config({}, num_warps=2),
        triton.Config({}, num_warps=8),
    ]

    @triton.autotune(configs=pick_configs(_CONFIGS), key=["M", "P", "FROM_LABELS", "BACKWARD"])
    @triton.jit
    def _bce_kernel(
        z_ptr, src_ptr, ids_ptr, sel_ptr, lid_ptr, mask_ptr, out_ptr, scale_ptr,
        M, N, K, Wp, S, bg,
        s0, s1, s2, s3, szm, szj, smb, smn,
        P: tl.constexpr, FROM_LABELS: tl.constexpr, BACKWARD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        """Rows m = ((b*K)+i)*N + n. Forward: out[pid] = Σ_rows mask[b,n]·Σ_j w·bce(z, t).
        Backward: out[m, j] = scale · mask[b,n] · w · (σ(z) − t), scale = grad/(p²·K·Σmask)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < M
        n, base, lid = _patch_rows(rows, rmask, ids_ptr, sel_ptr, lid_ptr, N, K, Wp, S,
                                   s0, s1, s2, s3, P, FROM_LABELS)
        b = rows.to(tl.int64) // N // K
        mval = tl.load(mask_ptr + b * smb + n * smn, mask=rmask, other=0.0).to(tl.float32)
        jj = tl.arange(0, BLOCK_J).to(tl.int64)
        jmask = jj < P * P
        m2 = rmask[:, None] & jmask[None, :]
        t = _patch_tile(src_ptr, base, lid, rmask, jj, s2, s3, P, FROM_LABELS) + 0.5
        z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * szm + jj[None, :] * szj,
                    mask=m2, other=0.0).to(tl.float32)
        w = tl.where(t == 0.0, bg, 1.0)
        if BACKWARD:
            scale = tl.load(scale_ptr).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-z))
            d = (sig - t) * w * (mval * scale)[:, None]
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * (P * P) + jj[None, :],
                     d.to(out_ptr.dtype.element_ty), mask=m2)
        else:
            loss = tl.maximum(z, 0.0) - z * t + tl.log(1.0 + tl.exp(-tl.abs(z)))
            loss = tl.where(m2, loss * w, 0.0)
            row = tl.sum(loss, axis=1) * mval
            tl.store(out_ptr + pid, tl.sum(row, axis=0))


@on_tensor_device
def _launch(logits, src, sel, lid, region_mask, P, bg, backward, scale=None):
    B, K, N, PP = logits.shape
    H, W = src.shape[-2:]
    M = B * K * N
    if M == 0:
        return new_empty((B, K, N, PP), logits.device, logits.dtype) if backward else \
            torch.zeros(1, device=logits.device)
    ids = torch.arange(N, device=logits.device, dtype=torch.int64).expand(B, N).contiguous()
    z = logits.reshape(M, PP)
    if backward:
        out = new_empty((B, K, N, PP), logits.device, logits.dtype)
    else:
        out = new_empty((triton.cdiv(M, _BLOCK_M),), logits.device, torch.float32)
    grid = (triton.cdiv(M, _BLOCK_M),)
    _bce_kernel[grid](
        z, src, ids, sel if sel is not None else ids, lid if lid is not None else ids, region_mask,
        out, scale if scale is not None else region_mask,
        M, N, K, W // P, src.shape[1], float(bg),
        *src.stride(), z.stride(0), z.stride(1), region_mask.stride(0), region_mask.stride(1),
        P=P, FROM_LABELS=sel is not None, BACKWARD=backward, BLOCK_M=_BLOCK_M,
        BLOCK_J=max(16, next_pow2(P * P)),
    )
    return out


class _RegionBCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, src, sel, lid, region_mask, P, bg):
        B, K = logits.shape[:2]
        denom = region_mask.float().sum()
        total = _launch(logits, src, sel, lid, region_mask, P, bg, backward=False).sum()
        ctx.save_for_backward(logits, src, sel, lid, region_mask, denom)
        ctx.meta = (P, bg)
        return total / (denom * (K * P * P))

    @staticmethod
    @once_differentiable  # (a second derivative raises instead of silently being zero)
    def backward(ctx, g):
        logits, src, sel, lid, region_mask, denom = ctx.saved_tensors
        P, bg = ctx.meta
        K = logits.shape[1]
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        scale = (g.float() / (denom * (K * P * P))).reshape(1)
        d = _launch(logits, src, sel, lid, region_mask, P, bg, backward=True, scale=scale)
        return d, None, None, None, None, None, None


def _validate(logits, B, K, H, W, region_mask, patch_size):
    P = patch_size
    if not isinstance(P, int) or P < 1 or H % P or W % P:
        raise ValueError(f"patch_size {P!r} must be a positive int dividing the map size {H}x{W}")
    N = (H // P) * (W // P)
    check_ndim(logits, 4, "logits", "[B, k, N, p*p]")
    check_float(logits, "logits")
    if tuple(logits.shape) != (B, K, N, P * P):
        raise ValueError(f"logits must be [B={B}, k={K}, N={N}, p*p={P * P}], got {tuple(logits.shape)}")
    check_float(region_mask, "region_mask")
    if tuple(region_mask.shape) != (B, N):
        raise ValueError(f"region_mask must be [B={B}, N={N}], got {tuple(region_mask.shape)}")


def _fixed_mask(region_mask) -> dict:
    """use_triton's ``fixed``: the kernels take region_mask as data (no gradient)."""
    return {"region_mask": (region_mask, "data")}


def region_bce_loss(logits, maps, region_mask, patch_size, bg_weight: float = 1.0, impl: str = "auto"):
    """Region loss from logits [B, k, N, p*p] and binary maps [B, k, H, W] (uint8/bool).

    region_mask [B, N] float, 1 on the patches that count (removed ones). Returns an fp32 scalar (float64 for
    float64 logits) equal to the model's BCE-with-logits region loss (optional background weight, mean over
    pixels and regions, masked mean over patches). Gradient flows to ``logits`` only.
    """
    check_ndim(maps, 4, "maps", "[B, k, H, W]")
    if maps.dtype not in MAP_DTYPES:
        raise TypeError(f"maps must be uint8 or bool binary maps (0/1), got {maps.dtype}")
    B, K, H, W = maps.shape
    _validate(logits, B, K, H, W, region_mask, patch_size)
    check_same_device(logits=logits, maps=maps, region_mask=region_mask)
    check_binary_maps(maps)
    if not use_triton(impl, logits, maps, region_mask, fixed=_fixed_mask(region_mask)):
        return region_bce_loss_reference(logits, maps, region_mask, patch_size, bg_weight)
    src = maps.view(torch.uint8) if maps.dtype == torch.bool else maps
    return _region_bce_triton(logits, src, None, None, region_mask, patch_size, bg_weight)


@opaque_to_compile
def _region_bce_triton(logits, src, sel, lid, region_mask, P, bg):
    if sel is not None:
        check_index_values(sel, src.shape[1], "scale_index")
    return _RegionBCE.apply(logits, src, sel, lid, region_mask, P, float(bg))


def region_bce_loss_from_labels(logits, labels, scale_index, label_id, region_mask, patch_size,
                                bg_weight: float = 1.0, impl: str = "auto"):
    """As :func:`region_bce_loss`, the maps given as ``labels[b, scale_index[b,i]] == label_id[b,i]``."""
    B, S, H, W, K = check_label_regions(labels, scale_index, label_id)
    _validate(logits, B, K, H, W, region_mask, patch_size)
    check_same_device(logits=logits, labels=labels, scale_index=scale_index, label_id=label_id,
                      region_mask=region_mask)
    if not use_triton(impl, logits, labels, scale_index, label_id, region_mask, fixed=_fixed_mask(region_mask)):
        check_index_values(scale_index, S, "scale_index")
        maps = labels_to_maps(labels, scale_index, label_id)
        return region_bce_loss_reference(logits, maps, region_mask, patch_size, bg_weight)
    return _region_bce_triton(logits, labels, scale_index.contiguous(), label_id.contiguous(), region_mask,
                              patch_size, bg_weight)
