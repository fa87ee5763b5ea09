"""``gather_visible``: keep the visible tokens of the image sequence and of the region sequences.

x [B, N, C] and regions [B, k, N, Cr] are gathered along N with the same ``ids_keep`` [B, L] per image,
in one launch. The backward writes the full [B, N, C] / [B, k, N, Cr] gradients in one pass, zeros
at the removed positions (no separate zero fill): it gathers through the inverse index map.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._dispatch import (
    HAS_TRITON,
    check_float,
    check_index_tensor,
    check_index_values,
    check_ndim,
    check_same_device,
    new_empty,
    on_tensor_device,
    opaque_to_compile,
    next_pow2,
    pick_configs,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["gather_visible", "gather_visible_reference"]


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
def gather_visible_reference(x, ids_keep, regions=None):
    """PyTorch reference: ``torch.gather`` along N (autograd through PyTorch)."""
    C = x.shape[-1]
    x_vis = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, C))
    if regions is None:
        return x_vis, None
    B, k, N, Cr = regions.shape
    idx = ids_keep[:, None, :, None].expand(-1, k, -1, Cr)
    return x_vis, torch.gather(regions, 2, idx)


# ---------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------
if HAS_TRITON:

    _CONFIGS = [
        triton.Config({"BLOCK_R": 4}, num_warps=4),
        triton.Config({"BLOCK_R": 1}, num_warps=4),
        triton.Config({"BLOCK_R": 8}, num_warps=8),
        triton.Config({"BLOCK_R": 16}, num_warps=8),
    ]

    @triton.autotune(configs=pick_configs(_CONFIGS), key=["R_OUT", "C", "CR", "DO_X", "DO_R"])
    @triton.jit
    def _gather_rows_kernel(
        x_ptr, r_ptr, idx_ptr, xo_ptr, ro_ptr,
        R_OUT, C, CR,
        sxb, sxn, sxc,
        srb, srk, srn, src_,
        soxb, soxn,
        sorb, sork, sorn,
        DO_X: tl.constexpr, DO_R: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CR: tl.constexpr,
    ):
        """out[b, r] = src[b, idx[b, r]] (or 0 where idx < 0), for x (z == 0) and each region (z >= 1)."""
        # (image, row block) flattened into grid axis 0: axes 1 and 2 stop at 65535 (row blocks of one row
        # reach that from 65536 rows)
        n_row_blocks = tl.cdiv(R_OUT, BLOCK_R)
        b = (tl.program_id(0) // n_row_blocks).to(tl.int64)
        pid_r = tl.program_id(0) % n_row_blocks
        j = tl.program_id(1) + (0 if DO_X else 1)  # 0: image sequence, 1..k: region j-1
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < R_OUT
        idx = tl.load(idx_ptr + b * R_OUT + rows, mask=rmask, other=-1)
        valid = idx >= 0
        src_row = tl.where(valid, idx, 0)
        if j == 0:
            cols = tl.arange(0, BLOCK_C).to(tl.int64)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cols
                cm = cc < C
                v = tl.load(
                    x_ptr + b * sxb + src_row[:, None] * sxn + cc[None, :] * sxc,
                    mask=valid[:, None] & cm[None, :], other=0.0,
                )
                tl.store(xo_ptr + b * soxb + rows[:, None] * soxn + cc[None, :], v,
                         mask=rmask[:, None] & cm[None, :])
        else:
            i = (j - 1).to(tl.int64)
            rcols = tl.arange(0, BLOCK_CR).to(tl.int64)
            for c0 in range(0, CR, BLOCK_CR):
                rc = c0 + rcols
                rm = rc < CR
                rv = tl.load(
                    r_ptr + b * srb + i * srk + src_row[:, None] * srn + rc[None, :] * src_,
                    mask=valid[:, None] & rm[None, :], other=0.0,
                )
                tl.store(ro_ptr + b * sorb + i * sork + rows[:, None] * sorn + rc[None, :], rv,
                         mask=rmask[:, None] & rm[None, :])


@on_tensor_device
def _launch_gather(x, regions, idx, r_out):
    """Gather rows of x [B, *, C] and regions [B, k, *, Cr] (either may be None) at idx [B, r_out].

    Rows with idx < 0 are written as zeros. Returns (x_out [B, r_out, C], r_out [B, k, r_out, Cr]).
    """
    ref = x if x is not None else regions
    B = idx.shape[0]
    do_x, do_r = x is not None, regions is not None
    if do_x:
        C = x.shape[-1]
        out_x = new_empty((B, r_out, C), x.device, x.dtype)
        sx = x.stride()
    else:
        out_x, C, sx = None, 1, (0, 0, 0)
    if do_r:
        k, Cr = regions.shape[1], regions.shape[-1]
        out_r = new_empty((B, k, r_out, Cr), regions.device, regions.dtype)
        sr = regions.stride()
    else:
        out_r, k, Cr, sr = None, 0, 1, (0, 0, 0, 0)
    nz = (1 if do_x else 0) + (k if do_r else 0)
    if nz == 0 or B == 0 or r_out == 0:
        return out_x, out_r
    dummy = ref
    grid = lambda meta: (B * triton.cdiv(r_out, meta["BLOCK_R"]), nz)  # noqa: E731
    _gather_rows_kernel[grid](
        x if do_x else dummy, regions if do_r else dummy, idx,
        out_x if do_x else dummy, out_r if do_r else dummy,
        r_out, C, Cr,
        *sx, *sr,
        out_x.stride(0) if do_x else 0, out_x.stride(1) if do_x else 0,
        out_r.stride(0) if do_r else 0, out_r.stride(1) if do_r else 0, out_r.stride(2) if do_r else 0,
        DO_X=do_x, DO_R=do_r,
        BLOCK_C=min(next_pow2(C), 1024), BLOCK_CR=min(next_pow2(Cr), 1024),
    )
    return out_x, out_r


def _inverse_index(ids_keep, N):
    """inv [B, N]: inv[b, ids_keep[b, l]] = l, -1 at removed positions (ids_keep rows distinct)."""
    B, L = ids_keep.shape
    inv = torch.full((B, N), -1, device=ids_keep.device, dtype=torch.int64)
    inv.scatter_(1, ids_keep, torch.arange(L, device=ids_keep.device, dtype=torch.int64).expand(B, L))
    return inv


class _GatherVisible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, regions):
        ids_keep = ids_keep.contiguous()
        x_vis, r_vis = _launch_gather(x, regions, ids_keep, ids_keep.shape[1])
        ctx.save_for_backward(ids_keep)
        ctx.N = x.shape[1]
        ctx.has_regions = regions is not None
        return x_vis, r_vis

    @staticmethod
    @once_differentiable  # (a second derivative raises instead of silently being zero)
    def backward(ctx, g_x, g_r):
        (ids_keep,) = ctx.saved_tensors
        need_x, _, need_r = ctx.needs_input_grad
        gx_in = g_x if need_x else None
        gr_in = g_r if (need_r and ctx.has_regions) else None
        if gx_in is None and gr_in is None:
            return None, None, None
        inv = _inverse_index(ids_keep, ctx.N)
        grad_x, grad_r = _launch_gather(gx_in, gr_in, inv, ctx.N)
        return grad_x, None, grad_r


def _validate(x, ids_keep, regions):
    check_ndim(x, 3, "x", "[B, N, C]")
    check_float(x, "x")
    B, N, C = x.shape
    check_ndim(ids_keep, 2, "ids_keep", "[B, L]")
    check_index_tensor(ids_keep, "ids_keep", (B, ids_keep.shape[1]), "[B, L]")
    L = ids_keep.shape[1]
    if L > N:
        raise ValueError(f"ids_keep keeps L={L} of only N={N} tokens")
    if regions is not None:
        check_ndim(regions, 4, "regions", "[B, k, N, Cr]")
        check_float(regions, "regions")
        if regions.shape[0] != B or regions.shape[2] != N:
            raise ValueError(
                f"regions must be [B={B}, k, N={N}, Cr], got {tuple(regions.shape)}"
            )
    check_same_device(x=x, ids_keep=ids_keep, regions=regions)


def gather_visible(x, ids_keep, regions=None, impl: str = "auto"):
    """Keep the visible tokens: ``x_vis[b, l] = x[b, ids_keep[b, l]]``, regions likewise per image.

    Args:
        x: [B, N, C] float tensor.
        ids_keep: [B, L] int64, distinct entries per row in [0, N) (the visible prefix of ids_shuffle).
        regions: optional [B, k, N, Cr] float tensor (Cr may differ from C).
        impl: "auto" | "triton" | "reference".

    Returns:
        (x_vis [B, L, C], regions_vis [B, k, L, Cr] or None). The backward scatters the gradients
        back, zeros at the removed positions.
    """
    _validate(x, ids_keep, regions)
    if not use_triton(impl, x, ids_keep, regions):
        check_index_values(ids_keep, x.shape[1], "ids_keep")
        return gather_visible_reference(x, ids_keep, regions)
    return _gather_visible_triton(x, ids_keep, regions)


@opaque_to_compile
def _gather_visible_triton(x, ids_keep, regions):
    check_index_values(ids_keep, x.shape[1], "ids_keep", distinct=True)
    return _GatherVisible.apply(x, ids_keep, regions)
