"""``unshuffle_fill``: MAE decoder input — fill removed slots with the mask token, unshuffle, add positions.

One pass: every output row reads either its visible token or the mask token and adds its position row.
The backward is one pass too: it reads the output gradient once and writes the gradient of x (a scatter
to distinct rows, since ids_restore is a permutation) and fp32 partial sums, per batch slice, for the
position gradient and the mask token (reduced by PyTorch; the batch is split so B=64 fills the GPU).
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
    interpreting,
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

__all__ = ["unshuffle_fill", "unshuffle_fill_reference"]


def unshuffle_fill_reference(x, mask_token, ids_restore, pos_embed):
    """facebookresearch/mae ``forward_decoder`` (embed → fill → unshuffle → + pos), verbatim."""
    B, _, C = x.shape
    N = ids_restore.shape[1]
    mask_tokens = mask_token.repeat(B, N + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, C))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


if HAS_TRITON:

    _FWD_CONFIGS = [
        triton.Config({"BLOCK_R": 4}, num_warps=4),
        triton.Config({"BLOCK_R": 1}, num_warps=4),
        triton.Config({"BLOCK_R": 8}, num_warps=8),
    ]

    @triton.autotune(configs=pick_configs(_FWD_CONFIGS), key=["NP1", "C", "L"])
    @triton.jit
    def _unshuffle_fwd_kernel(
        x_ptr, m_ptr, ids_ptr, pos_ptr, out_ptr,
        NP1, L, C,
        sxb, sxn, sxc, smc, sib, sin, spn, spc,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # (image, row block) flattened into grid axis 0: axis 1 stops at 65535 (row blocks of one row reach
        # that from 65535 patches)
        n_row_blocks = tl.cdiv(NP1, BLOCK_R)
        b = (tl.program_id(0) // n_row_blocks).to(tl.int64)
        pid_r = tl.program_id(0) % n_row_blocks
        t = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # output row, 0 = cls
        tmask = t < NP1
        is_tok = (t > 0) & tmask
        r = tl.load(ids_ptr + b * sib + (t - 1) * sin, mask=is_tok, other=0)
        is_mask = is_tok & (r >= L)
        from_x = tmask & (is_mask == 0)
        src = tl.where(t > 0, r + 1, 0)
        src = tl.where(from_x, src, 0)
        cols = tl.arange(0, BLOCK_C).to(tl.int64)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            cm = cc < C
            xv = tl.load(x_ptr + b * sxb + src[:, None] * sxn + cc[None, :] * sxc,
                         mask=from_x[:, None] & cm[None, :], other=0.0).to(tl.float32)
            mv = tl.load(m_ptr + cc * smc, mask=cm, other=0.0).to(tl.float32)
            pv = tl.load(pos_ptr + t[:, None] * spn + cc[None, :] * spc,
                         mask=tmask[:, None] & cm[None, :], other=0.0).to(tl.float32)
            v = tl.where(is_mask[:, None], mv[None, :], xv) + pv
            tl.store(out_ptr + b * NP1 * C + t[:, None] * C + cc[None, :],
                     v.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cm[None, :])

    # BLOCK_R is fixed by the launcher (it sizes the mask-token partial sums); only BLOCK_C is tuned.
    _BWD_BLOCK_R = 4
    _BWD_CONFIGS = [
        triton.Config({"BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_C": 256}, num_warps=4),
        triton.Config({"BLOCK_C": 64}, num_warps=2),
        triton.Config({"BLOCK_C": 512}, num_warps=8),
    ]

    @triton.autotune(configs=pick_configs(_BWD_CONFIGS), key=["NP1", "C", "L", "B", "BSPLIT"])
    @triton.jit
    def _unshuffle_bwd_kernel(
        g_ptr, ids_ptr, gx_ptr, gpos_part_ptr, gm_part_ptr,
        B, NP1, L, C, BSPLIT, B_PER,
        sgb, sgn, sgc, sib, sin,
        NEED_X: tl.constexpr, NEED_POS: tl.constexpr, NEED_M: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Program (row block, column block, batch slice): images [pid_s·B_PER, (pid_s+1)·B_PER).
        Writes grad_x rows (scatter to distinct rows), and fp32 partial sums per batch slice for the
        position gradient [BSPLIT, N+1, C] and the mask token [BSPLIT, n_row_blocks, C]."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_s = tl.program_id(2)
        b0 = pid_s * B_PER
        b1 = tl.minimum(b0 + B_PER, B)
        t = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        tmask = t < NP1
        is_tok = (t > 0) & tmask
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        cm = cc < C
        m2 = tmask[:, None] & cm[None, :]
        pos_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        m_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        b0_64 = b0.to(tl.int64)
        g_b = g_ptr + b0_64 * sgb + t[:, None] * sgn + cc[None, :] * sgc
        ids_b = ids_ptr + b0_64 * sib + (t - 1) * sin
        gx_b = gx_ptr + b0_64 * (L + 1) * C
        for _b in range(b0, b1):
            g = tl.load(g_b, mask=m2, other=0.0).to(tl.float32)
            r = tl.load(ids_b, mask=is_tok, other=0)
            is_mask = is_tok & (r >= L)
            if NEED_POS:
                pos_acc += g
            if NEED_M:
                m_acc += tl.sum(tl.where(is_mask[:, None], g, 0.0), axis=0)
            if NEED_X:
                from_x = tmask & (is_mask == 0)
                dst = tl.where(t > 0, r + 1, 0)
                dst = tl.where(from_x, dst, 0)
                tl.store(gx_b + dst[:, None] * C + cc[None, :],
                         g.to(gx_ptr.dtype.element_ty), mask=from_x[:, None] & cm[None, :])
            g_b += sgb
            ids_b += sib
            gx_b += (L + 1) * C
        if NEED_POS:
            tl.store(gpos_part_ptr + (pid_s.to(tl.int64) * NP1 + t[:, None]) * C + cc[None, :],
                     pos_acc, mask=m2)
        if NEED_M:
            tl.store(gm_part_ptr + (pid_s.to(tl.int64) * tl.num_programs(0) + pid_r) * C + cc, m_acc,
                     mask=cm)


def _out_dtype(x, mask_token, pos_embed):
    return torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)


@on_tensor_device
def _launch_fwd(x, mask_token, ids_restore, pos_embed):
    B, Lp1, C = x.shape
    N = ids_restore.shape[1]
    out = new_empty((B, N + 1, C), x.device, _out_dtype(x, mask_token, pos_embed))
    if B == 0:
        return out
    grid = lambda meta: (B * triton.cdiv(N + 1, meta["BLOCK_R"]),)  # noqa: E731
    _unshuffle_fwd_kernel[grid](
        x, mask_token, ids_restore, pos_embed, out,
        N + 1, Lp1 - 1, C,
        *x.stride(), mask_token.stride(2), *ids_restore.stride(), pos_embed.stride(1), pos_embed.stride(2),
        BLOCK_C=min(next_pow2(C), 512),
    )
    return out


@on_tensor_device
def _launch_bwd(g, ids_restore, L, x_dtype, m_dtype, pos_dtype, need_x, need_m, need_pos, bsplit=None):
    """Returns (grad_x [B, L+1, C], grad_mask [1, 1, C], grad_pos [1, N+1, C]) (None where not needed).

    ``bsplit``: number of batch slices run in parallel (default: enough programs to fill the GPU;
    2 under the interpreter so the split path is exercised)."""
    B, NP1, C = g.shape
    dev = g.device
    if B == 0:  # nothing to launch: no rows, zero parameter gradients
        return (new_empty((0, L + 1, C), dev, x_dtype) if need_x else None,
                torch.zeros((1, 1, C), device=dev, dtype=m_dtype) if need_m else None,
                torch.zeros((1, NP1, C), device=dev, dtype=pos_dtype) if need_pos else None)
    n_rb = triton.cdiv(NP1, _BWD_BLOCK_R)
    if bsplit is None:
        if interpreting():
            bsplit = 2
        else:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
            bsplit = triton.cdiv(4 * sms, n_rb * triton.cdiv(C, 128))
    bsplit = max(1, min(int(bsplit), B))
    b_per = triton.cdiv(B, bsplit)
    bsplit = triton.cdiv(B, b_per)  # no empty slices
    gx = new_empty((B, L + 1, C), dev, x_dtype) if need_x else None
    gpos_part = new_empty((bsplit, NP1, C), dev, torch.float32) if need_pos else None
    gm_part = new_empty((bsplit, n_rb, C), dev, torch.float32) if need_m else None
    dummy = g
    grid = lambda meta: (n_rb, triton.cdiv(C, meta["BLOCK_C"]), bsplit)  # noqa: E731
    _unshuffle_bwd_kernel[grid](
        g, ids_restore, gx if need_x else dummy, gpos_part if need_pos else dummy,
        gm_part if need_m else dummy,
        B, NP1, L, C, bsplit, b_per,
        *g.stride(), *ids_restore.stride(),
        NEED_X=need_x, NEED_POS=need_pos, NEED_M=need_m, BLOCK_R=_BWD_BLOCK_R,
    )
    gm = gm_part.sum((0, 1)).to(m_dtype).view(1, 1, C) if need_m else None
    gpos = gpos_part.sum(0, keepdim=True).to(pos_dtype) if need_pos else None
    return gx, gm, gpos


class _UnshuffleFill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_token, ids_restore, pos_embed):
        ids_restore = ids_restore.contiguous()
        out = _launch_fwd(x, mask_token, ids_restore, pos_embed)
        ctx.save_for_backward(ids_restore)
        ctx.L = x.shape[1] - 1
        ctx.dtypes = (x.dtype, mask_token.dtype, pos_embed.dtype)
        return out

    @staticmethod
    @once_differentiable  # (a second derivative raises instead of silently being zero)
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        need_x, need_m, _, need_pos = ctx.needs_input_grad
        if not (need_x or need_m or need_pos):
            return None, None, None, None
        gx, gm, gpos = _launch_bwd(g, ids_restore, ctx.L, *ctx.dtypes, need_x, need_m, need_pos)
        return gx, gm, None, gpos


def _validate(x, mask_token, ids_restore, pos_embed):
    check_ndim(x, 3, "x", "[B, 1+L, C]")
    check_float(x, "x")
    B, Lp1, C = x.shape
    if Lp1 < 1:
        raise ValueError("x must hold the cls token first: [B, 1+L, C] with 1+L >= 1")
    check_ndim(ids_restore, 2, "ids_restore", "[B, N]")
    check_index_tensor(ids_restore, "ids_restore", (B, ids_restore.shape[1]), "[B, N]")
    N = ids_restore.shape[1]
    if Lp1 - 1 > N:
        raise ValueError(f"x holds L={Lp1 - 1} visible tokens but ids_restore has only N={N}")
    check_float(mask_token, "mask_token")
    if tuple(mask_token.shape) != (1, 1, C):
        raise ValueError(f"mask_token must be [1, 1, C={C}], got {tuple(mask_token.shape)}")
    check_float(pos_embed, "pos_embed")
    if tuple(pos_embed.shape) != (1, N + 1, C):
        raise ValueError(f"pos_embed must be [1, N+1={N + 1}, C={C}], got {tuple(pos_embed.shape)}")
    check_same_device(x=x, mask_token=mask_token, ids_restore=ids_restore, pos_embed=pos_embed)


def unshuffle_fill(x, mask_token, ids_restore, pos_embed, impl: str = "auto"):
    """MAE decoder fill + unshuffle + positions, in one pass.

    Args:
        x: [B, 1+L, C] — cls token, then the L visible tokens in ids_shuffle order.
        mask_token: [1, 1, C].
        ids_restore: [B, N] int64, a permutation of 0..N-1 per row (argsort of ids_shuffle).
        pos_embed: [1, N+1, C] (a buffer or a parameter; its gradient is returned only if it requires grad).

    Returns:
        [B, N+1, C] in the promoted dtype of (x, mask_token, pos_embed), exactly
        ``cat([x[:, :1], gather(cat([x[:, 1:], mask_tokens]), ids_restore)]) + pos_embed``.
    """
    _validate(x, mask_token, ids_restore, pos_embed)
    N = ids_restore.shape[1]
    if not use_triton(impl, x, mask_token, ids_restore, pos_embed):
        check_index_values(ids_restore, N, "ids_restore")
        return unshuffle_fill_reference(x, mask_token, ids_restore, pos_embed)
    return _unshuffle_fill_triton(x, mask_token, ids_restore, pos_embed)


@opaque_to_compile
def _unshuffle_fill_triton(x, mask_token, ids_restore, pos_embed):
    check_index_values(ids_restore, ids_restore.shape[1], "ids_restore", permutation=True)
    return _UnshuffleFill.apply(x, mask_token, ids_restore, pos_embed)
