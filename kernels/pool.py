"""``region_query_pool``: mean over the L visible tokens of each region, fusing the last residual add.

``out[b, i] = mean_l (x[b, i, l] + residual[b, i, l])`` (or of x alone). Every one of the L tokens counts.
The sum accumulates in fp32. The backward writes ``grad / L`` broadcast over L into both inputs' gradients
in one pass (two separate buffers, so autograd never sees aliased gradients).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._dispatch import (
    HAS_TRITON,
    check_float,
    check_ndim,
    check_same_device,
    new_empty,
    on_tensor_device,
    opaque_to_compile,
    pick_configs,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["region_query_pool", "region_query_pool_reference"]


def region_query_pool_reference(x, residual=None):
    """PyTorch reference: ``(x + residual).mean(dim=2)``."""
    if residual is not None:
        x = x + residual
    return x.mean(dim=2)


if HAS_TRITON:

    _CONFIGS = [
        triton.Config({"BLOCK_L": 16, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_L": 8, "BLOCK_C": 128}, num_warps=2),
        triton.Config({"BLOCK_L": 32, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_L": 64, "BLOCK_C": 128}, num_warps=8),
    ]

    @triton.autotune(configs=pick_configs(_CONFIGS), key=["L", "C", "HAS_RES"])
    @triton.jit
    def _pool_fwd_kernel(
        x_ptr, r_ptr, out_ptr,
        K, L, C,
        sxb, sxk, sxl, sxc, srb, srk, srl, src_,
        HAS_RES: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = (pid // K).to(tl.int64)
        i = (pid % K).to(tl.int64)
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        cm = cc < C
        ls = tl.arange(0, BLOCK_L).to(tl.int64)
        acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            ll = l0 + ls
            m = (ll < L)[:, None] & cm[None, :]
            v = tl.load(x_ptr + b * sxb + i * sxk + ll[:, None] * sxl + cc[None, :] * sxc,
                        mask=m, other=0.0).to(tl.float32)
            if HAS_RES:
                v += tl.load(r_ptr + b * srb + i * srk + ll[:, None] * srl + cc[None, :] * src_,
                             mask=m, other=0.0).to(tl.float32)
            acc += v
        mean = tl.sum(acc, axis=0) / L
        tl.store(out_ptr + pid.to(tl.int64) * C + cc, mean.to(out_ptr.dtype.element_ty), mask=cm)

    @triton.autotune(configs=pick_configs(_CONFIGS), key=["L", "C", "HAS_RES"])
    @triton.jit
    def _pool_bwd_kernel(
        g_ptr, gx_ptr, gr_ptr,
        K, L, C,
        sgb, sgk, sgc,
        NEED_X: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = (pid // K).to(tl.int64)
        i = (pid % K).to(tl.int64)
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        cm = cc < C
        g = tl.load(g_ptr + b * sgb + i * sgk + cc * sgc, mask=cm, other=0.0).to(tl.float32) / L
        tile = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32) + g[None, :]
        base = pid.to(tl.int64) * L * C
        ls = tl.arange(0, BLOCK_L).to(tl.int64)
        for l0 in range(0, L, BLOCK_L):
            ll = l0 + ls
            m = (ll < L)[:, None] & cm[None, :]
            off = base + ll[:, None] * C + cc[None, :]
            if NEED_X:
                tl.store(gx_ptr + off, tile.to(gx_ptr.dtype.element_ty), mask=m)
            if HAS_RES:
                tl.store(gr_ptr + off, tile.to(gr_ptr.dtype.element_ty), mask=m)


@on_tensor_device
def _launch_fwd(x, residual):
    B, K, L, C = x.shape
    dt = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = new_empty((B, K, C), x.device, dt)
    if B * K == 0:
        return out
    r = residual if residual is not None else x
    grid = lambda meta: (B * K, triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _pool_fwd_kernel[grid](x, r, out, K, L, C, *x.stride(), *r.stride(), HAS_RES=residual is not None)
    return out


@on_tensor_device
def _launch_bwd(g, L, x_dtype, r_dtype, need_x, need_r):
    B, K, C = g.shape
    gx = new_empty((B, K, L, C), g.device, x_dtype) if need_x else None
    gr = new_empty((B, K, L, C), g.device, r_dtype) if need_r else None
    if B * K == 0 or L == 0:
        return gx, gr
    ref = gx if gx is not None else gr
    grid = lambda meta: (B * K, triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    _pool_bwd_kernel[grid](
        g, gx if need_x else ref, gr if need_r else ref, K, L, C, g.stride(0), g.stride(1), g.stride(2),
        NEED_X=need_x, HAS_RES=need_r,
    )
    return gx, gr


class _RegionQueryPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual):
        ctx.L = x.shape[2]
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.has_res = residual is not None
        return _launch_fwd(x, residual)

    @staticmethod
    @once_differentiable  # (a second derivative raises instead of silently being zero)
    def backward(ctx, g):
        need_x, need_r = ctx.needs_input_grad
        need_r = need_r and ctx.has_res
        if not (need_x or need_r):
            return None, None
        gx, gr = _launch_bwd(g, ctx.L, ctx.dtypes[0], ctx.dtypes[1], need_x, need_r)
        return gx, gr


def _validate(x, residual):
    check_ndim(x, 4, "x", "[B, k, L, C]")
    check_float(x, "x")
    if x.shape[2] == 0:
        raise ValueError("x must hold at least one token per region (L >= 1)")
    if residual is not None:
        check_float(residual, "residual")
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(
                f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        check_same_device(x=x, residual=residual)


def region_query_pool(x, residual=None, impl: str = "auto"):
    """Region queries: mean over the L tokens of each region, of ``x + residual`` when given.

    Args:
        x: [B, k, L, C] (e.g. the region encoder block's last branch output).
        residual: optional [B, k, L, C] (that block's residual stream), added before the mean.

    Returns:
        [B, k, C] in the promoted dtype of the inputs (fp32 accumulation in the Triton path).
    """
    _validate(x, residual)
    if not use_triton(impl, x, residual):
        return region_query_pool_reference(x, residual)
    return _region_query_pool_triton(x, residual)


@opaque_to_compile
def _region_query_pool_triton(x, residual):
    return _RegionQueryPool.apply(x, residual)
