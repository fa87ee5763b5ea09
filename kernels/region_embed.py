"""``region_tokens`` / ``region_tokens_from_labels``: embed the visible patches of binary region maps.

Semantics (the reference): ``conv2d(maps - 0.5, weight, bias, stride=p)`` flattened to [B, k, N, D], plus
the fixed position table, gathered at ``ids_keep`` → [B, k, L, D].

The Triton path never materialises the float [B, k, H, W] maps nor the embeddings of masked patches:
each program takes a tile of (region, visible patch) rows, loads only those patches' uint8 pixels (or
label values, compared with the region's label id on the fly), subtracts 0.5 and multiplies by the
weight viewed as [D, p·p] with ``tl.dot``, then adds bias and position. The backward computes the
weight and bias gradients (the maps are data) as split-M partial sums of ``Gᵀ·A``, re-reading the
patch pixels instead of saving a float copy; the partials are summed by PyTorch (no atomics: one launch
config gives the same bits every run; the autotuner's pick, timed once per shape, sets the summation order).

fp32 weights use ``tf32x3`` dots on the GPU (about fp32 accuracy); bf16/fp16 weights dot in their own
dtype (the ±0.5 inputs are exact in it) with fp32 accumulation.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from ._dispatch import (
    HAS_TRITON,
    check_binary_maps,
    check_float,
    check_index_tensor,
    check_index_values,
    check_indices_enabled,
    check_ndim,
    check_same_device,
    interpreting,
    is_compiling,
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

__all__ = [
    "region_tokens",
    "region_tokens_reference",
    "region_tokens_from_labels",
    "region_tokens_from_labels_reference",
    "labels_to_maps",
]

MAP_DTYPES = (torch.uint8, torch.bool)
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64) + (
    (torch.uint16,) if hasattr(torch, "uint16") else ()
)


def check_label_regions(labels, scale_index, label_id) -> tuple[int, int, int, int, int]:
    """Validates regions given as label maps [B, S, H, W] plus (scale_index, label_id) [B, k];
    returns B, S, H, W, k."""
    check_ndim(labels, 4, "labels", "[B, S, H, W]")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer label map {LABEL_DTYPES}, got {labels.dtype}")
    B, S, H, W = labels.shape
    check_ndim(scale_index, 2, "scale_index", "[B, k]")
    K = scale_index.shape[1]
    check_index_tensor(scale_index, "scale_index", (B, K), "[B, k]")
    check_index_tensor(label_id, "label_id", (B, K), "[B, k]")
    return B, S, H, W, K


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
def region_tokens_reference(maps, ids_keep, weight, bias, pos_embed, patch_size):
    """Conv2d(1→D, p, stride p) on ``maps - 0.5``, + pos, gathered at ids_keep (materialises everything)."""
    B, K, H, W = maps.shape
    D = weight.shape[0]
    r = maps.reshape(B * K, 1, H, W).to(weight.dtype) - 0.5
    emb = F.conv2d(r, weight, bias, stride=patch_size)  # [B*K, D, H/p, W/p]
    emb = emb.flatten(2).transpose(1, 2) + pos_embed  # [B*K, N, D]
    N = emb.shape[1]
    emb = emb.reshape(B, K, N, D)
    return torch.gather(emb, 2, ids_keep[:, None, :, None].expand(-1, K, -1, D))


def labels_to_maps(labels, scale_index, label_id):
    """Binary maps [B, k, H, W] (bool): ``labels[b, scale_index[b, i]] == label_id[b, i]``; id -1 → all 0."""
    B, S, H, W = labels.shape
    if labels.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        labels = labels.to(torch.int32)  # uint16: few torch ops support it
    sel = torch.gather(labels, 1, scale_index[:, :, None, None].expand(-1, -1, H, W))
    lid = label_id[:, :, None, None]
    return (sel.to(torch.int64) == lid) & (lid >= 0)


def region_tokens_from_labels_reference(labels, scale_index, label_id, ids_keep, weight, bias,
                                        pos_embed, patch_size):
    return region_tokens_reference(labels_to_maps(labels, scale_index, label_id), ids_keep, weight,
                                   bias, pos_embed, patch_size)


# ---------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _patch_rows(rows, rmask, ids_ptr, sel_ptr, lid_ptr, L, K, Wp, S,
                    s0, s1, s2, s3, P: tl.constexpr, FROM_LABELS: tl.constexpr):
        """Per row m = ((b*K)+i)*L + l: the patch index n, the pixel base offset of the patch, the label id.
        A scale index outside [0, S) (data the index checks no longer look at) makes the region empty
        (label id -1, plane 0 read) instead of an out-of-bounds read."""
        rows = rows.to(tl.int64)
        bi = rows // L
        l = rows % L
        b = bi // K
        i = bi % K
        n = tl.load(ids_ptr + b * L + l, mask=rmask, other=0)
        ph = n // Wp
        pw = n % Wp
        if FROM_LABELS:
            s = tl.load(sel_ptr + bi, mask=rmask, other=0)
            lid = tl.load(lid_ptr + bi, mask=rmask, other=-1)
            in_range = (s >= 0) & (s < S)
            lid = tl.where(in_range, lid, -1)
            s = tl.where(in_range, s, 0)
            base = b * s0 + s * s1 + (ph * P) * s2 + (pw * P) * s3
        else:
            lid = n  # unused
            base = b * s0 + i * s1 + (ph * P) * s2 + (pw * P) * s3
        return n, base, lid

    @triton.jit
    def _patch_tile(src_ptr, base, lid, rmask, kk, s2, s3, P: tl.constexpr, FROM_LABELS: tl.constexpr):
        """A[m, kk] = pixel - 0.5 (fp32) for the rows' patches, pixel (u, v) = divmod(kk, P)."""
        kmask = kk < P * P
        u = kk // P
        v = kk % P
        off = base[:, None] + (u * s2 + v * s3)[None, :]
        val = tl.load(src_ptr + off, mask=rmask[:, None] & kmask[None, :], other=0)
        if FROM_LABELS:
            hit = (val.to(tl.int64) == lid[:, None]) & (lid[:, None] >= 0)
            a = tl.where(hit, 0.5, -0.5)
        else:
            a = val.to(tl.float32) - 0.5
        return a

    _FWD_CONFIGS = [
        triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
    ]

    @triton.autotune(configs=pick_configs(_FWD_CONFIGS), key=["M", "D", "P", "FROM_LABELS", "DOT_F32"])
    @triton.jit
    def _region_tokens_fwd_kernel(
        src_ptr, ids_ptr, sel_ptr, lid_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
        M, L, K, Wp, D, S,
        s0, s1, s2, s3, spn, spd,
        P: tl.constexpr, FROM_LABELS: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < M
        n, base, lid = _patch_rows(rows, rmask, ids_ptr, sel_ptr, lid_ptr, L, K, Wp, S,
                                   s0, s1, s2, s3, P, FROM_LABELS)
        dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = dd < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        kr = tl.arange(0, BLOCK_K).to(tl.int64)
        for k0 in range(0, P * P, BLOCK_K):
            kk = k0 + kr
            a = _patch_tile(src_ptr, base, lid, rmask, kk, s2, s3, P, FROM_LABELS)
            # weight viewed as [D, P*P] (contiguous): tile Wᵀ [BLOCK_K, BLOCK_D]
            wt = tl.load(w_ptr + dd[None, :] * (P * P) + kk[:, None],
                         mask=(kk < P * P)[:, None] & dmask[None, :], other=0.0)
            if DOT_F32:
                acc += tl.dot(a, wt.to(tl.float32), input_precision="tf32x3")
            else:
                acc += tl.dot(a.to(wt.dtype), wt)
        bias = tl.load(b_ptr + dd, mask=dmask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + n[:, None] * spn + dd[None, :] * spd,
                      mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += bias[None, :] + pos
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])

    _BWD_CONFIGS = [
        triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=2),
    ]

    @triton.autotune(configs=pick_configs(_BWD_CONFIGS), key=["M", "D", "P", "FROM_LABELS", "DOT_F32", "SPLIT"])
    @triton.jit
    def _region_tokens_bwd_kernel(
        src_ptr, ids_ptr, sel_ptr, lid_ptr, g_ptr, gw_part_ptr, gb_part_ptr,
        M, L, K, Wp, D, SPLIT, S,
        s0, s1, s2, s3, sgm, sgd,
        P: tl.constexpr, FROM_LABELS: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Partial sums over the rows m ≡ pid_s (mod SPLIT blocks): gW[d, kk] += G[m, d]·A[m, kk], gb[d] += G[m, d]."""
        pid_d = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_s = tl.program_id(2)
        dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = dd < D
        kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = kk < P * P
        acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
        bacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        mr = tl.arange(0, BLOCK_M).to(tl.int64)
        for m0 in range(pid_s * BLOCK_M, M, SPLIT * BLOCK_M):
            rows = m0 + mr
            rmask = rows < M
            n, base, lid = _patch_rows(rows, rmask, ids_ptr, sel_ptr, lid_ptr, L, K, Wp, S,
                                       s0, s1, s2, s3, P, FROM_LABELS)
            a = _patch_tile(src_ptr, base, lid, rmask, kk, s2, s3, P, FROM_LABELS)
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * sgm + dd[None, :] * sgd,
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            bacc += tl.sum(g.to(tl.float32), axis=0)
            if DOT_F32:
                acc += tl.dot(tl.trans(g.to(tl.float32)), a, input_precision="tf32x3")
            else:
                acc += tl.dot(tl.trans(g), a.to(g.dtype))
        part = pid_s.to(tl.int64) * D * (P * P)
        tl.store(gw_part_ptr + part + dd[:, None] * (P * P) + kk[None, :], acc,
                 mask=dmask[:, None] & kmask[None, :])
        if pid_k == 0:
            tl.store(gb_part_ptr + pid_s.to(tl.int64) * D + dd, bacc, mask=dmask)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _blocks(D, P):
    BLOCK_D = min(max(next_pow2(D), 16), 128)
    BLOCK_K = min(max(next_pow2(P * P), 16), 64)
    return BLOCK_D, BLOCK_K


def _out_dtype(weight, bias, pos_embed):
    return torch.promote_types(torch.promote_types(weight.dtype, bias.dtype), pos_embed.dtype)


def _src_strides(src):
    return tuple(src.stride())


@on_tensor_device
def _launch_fwd(src, ids_keep, sel, lid, weight, bias, pos_embed, P, K, from_labels):
    """src: maps [B, K, H, W] (uint8) or labels [B, S, H, W]; returns [B, K, L, D]."""
    B, _, H, W = src.shape
    L = ids_keep.shape[1]
    D = weight.shape[0]
    M = B * K * L
    out = new_empty((B, K, L, D), src.device, _out_dtype(weight, bias, pos_embed))
    if M == 0:
        return out
    BLOCK_D, BLOCK_K = _blocks(D, P)
    dot_f32 = weight.dtype == torch.float32 or interpreting()
    w2 = weight.reshape(D, P * P).contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, BLOCK_D))  # noqa: E731
    _region_tokens_fwd_kernel[grid](
        src, ids_keep, sel if sel is not None else ids_keep, lid if lid is not None else ids_keep,
        w2, bias.contiguous(), pos_embed, out,
        M, L, K, W // P, D, src.shape[1],
        *_src_strides(src), pos_embed.stride(1), pos_embed.stride(2),
        P=P, FROM_LABELS=from_labels, DOT_F32=dot_f32, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K,
    )
    return out


@on_tensor_device
def _launch_bwd(g, src, ids_keep, sel, lid, P, K, w_dtype, b_dtype, need_w, need_b, split=None):
    B, _, H, W = src.shape
    L = ids_keep.shape[1]
    D = g.shape[-1]
    M = B * K * L
    g2 = g.reshape(M, D)  # a view when possible; strides passed
    BLOCK_D, BLOCK_K = _blocks(D, P)
    n_tiles = triton.cdiv(D, BLOCK_D) * triton.cdiv(P * P, BLOCK_K)
    if split is None:
        target = 2 if interpreting() else max(1, (2 * _num_sms(g.device)) // n_tiles)
        split = max(1, min(target, triton.cdiv(M, 32)))
    gw_part = new_empty((split, D, P * P), g.device, torch.float32)
    gb_part = new_empty((split, D), g.device, torch.float32)
    if M == 0:
        gw_part.zero_()
        gb_part.zero_()
    else:
        dot_f32 = g.dtype == torch.float32 or interpreting()
        if not dot_f32 and g2.dtype not in (torch.float16, torch.bfloat16):  # pragma: no cover
            dot_f32 = True
        grid = (triton.cdiv(D, BLOCK_D), triton.cdiv(P * P, BLOCK_K), split)
        _region_tokens_bwd_kernel[grid](
            src, ids_keep, sel if sel is not None else ids_keep, lid if lid is not None else ids_keep,
            g2, gw_part, gb_part,
            M, L, K, W // P, D, split, src.shape[1],
            *_src_strides(src), g2.stride(0), g2.stride(1),
            P=P, FROM_LABELS=sel is not None, DOT_F32=dot_f32, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K,
        )
    gw = gw_part.sum(0).reshape(D, 1, P, P).to(w_dtype) if need_w else None
    gb = gb_part.sum(0).to(b_dtype) if need_b else None
    return gw, gb



class _RegionTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, src, ids_keep, sel, lid, pos_embed, P, K):
        from_labels = sel is not None
        out = _launch_fwd(src, ids_keep, sel, lid, weight, bias, pos_embed, P, K, from_labels)
        ctx.save_for_backward(src, ids_keep, sel, lid)
        ctx.meta = (P, K, weight.dtype, bias.dtype)
        return out

    @staticmethod
    @once_differentiable  # (a second derivative raises instead of silently being zero)
    def backward(ctx, g):
        src, ids_keep, sel, lid = ctx.saved_tensors
        P, K, w_dtype, b_dtype = ctx.meta
        need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.needs_input_grad[6]:
            raise RuntimeError("region_tokens: pos_embed is a fixed table; its gradient is not computed")
        if not (need_w or need_b):
            return (None,) * 9
        gw, gb = _launch_bwd(g, src, ids_keep, sel, lid, P, K, w_dtype, b_dtype, need_w, need_b)
        return gw, gb, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# validation + dispatch
# ---------------------------------------------------------------------------------------------------
def _validate_params(B, H, W, ids_keep, weight, bias, pos_embed, patch_size):
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"map size {H}x{W} is not a multiple of patch_size {P}")
    N = (H // P) * (W // P)
    check_ndim(weight, 4, "weight", "[D, 1, p, p]")
    check_float(weight, "weight")
    D = weight.shape[0]
    if tuple(weight.shape[1:]) != (1, P, P):
        raise ValueError(f"weight must be [D, 1, {P}, {P}], got {tuple(weight.shape)}")
    check_float(bias, "bias")
    if tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be [D={D}], got {tuple(bias.shape)}")
    check_float(pos_embed, "pos_embed")
    if tuple(pos_embed.shape) != (1, N, D):
        raise ValueError(f"pos_embed must be [1, N={N}, D={D}] (no cls row), got {tuple(pos_embed.shape)}")
    check_ndim(ids_keep, 2, "ids_keep", "[B, L]")
    check_index_tensor(ids_keep, "ids_keep", (B, ids_keep.shape[1]), "[B, L]")
    return N


def _validate_maps(maps, ids_keep, weight, bias, pos_embed, patch_size):
    check_ndim(maps, 4, "maps", "[B, k, H, W]")
    if maps.dtype not in MAP_DTYPES:
        raise TypeError(f"maps must be uint8 or bool binary maps (0/1), got {maps.dtype}")
    B, K, H, W = maps.shape
    N = _validate_params(B, H, W, ids_keep, weight, bias, pos_embed, patch_size)
    check_same_device(maps=maps, ids_keep=ids_keep, weight=weight, bias=bias, pos_embed=pos_embed)
    return N


def _fixed_pos(pos_embed) -> dict:
    """use_triton's ``fixed``: the kernels take pos_embed as a constant (no gradient)."""
    return {"pos_embed": (pos_embed, "a fixed sin-cos table")}


def region_tokens(maps, ids_keep, weight, bias, pos_embed, patch_size, impl: str = "auto"):
    """Visible region tokens from binary maps.

    Args:
        maps: [B, k, H, W] uint8 or bool, values 0/1.
        ids_keep: [B, L] int64, row-major patch indices in [0, N), N = (H/p)·(W/p).
        weight: [D, 1, p, p] (the Conv2d(1→D, p, stride p) weight); bias: [D].
        pos_embed: [1, N, D] fixed sin-cos table (no cls row, no gradient).
        patch_size: p.

    Returns:
        [B, k, L, D] = (conv2d(maps - 0.5, weight, bias, stride=p) + pos_embed) at ids_keep, in the
        promoted dtype of (weight, bias, pos_embed). Gradients flow to weight and bias only.
    """
    _validate_maps(maps, ids_keep, weight, bias, pos_embed, patch_size)
    check_binary_maps(maps)
    if not use_triton(impl, maps, ids_keep, weight, bias, pos_embed, fixed=_fixed_pos(pos_embed)):
        _check_values(maps, ids_keep, patch_size, None, None)
        return region_tokens_reference(maps, ids_keep, weight, bias, pos_embed, patch_size)
    src = maps.view(torch.uint8) if maps.dtype == torch.bool else maps
    return _region_tokens_triton(weight, bias, src, ids_keep, None, None, pos_embed, patch_size, maps.shape[1])


def _check_values(src, ids_keep, P, scale_index, label_id):
    """Value checks (one host sync each; skipped under RMAE_KERNELS_CHECK_INDICES=0 or while tracing)."""
    H, W = src.shape[-2:]
    check_index_values(ids_keep, (H // P) * (W // P), "ids_keep")
    if scale_index is not None:
        check_index_values(scale_index, src.shape[1], "scale_index")
        if not is_compiling() and label_id.numel() and check_indices_enabled() and bool((label_id < -1).any()):
            raise ValueError("label_id must be >= -1 (-1 = empty region)")


@opaque_to_compile
def _region_tokens_triton(weight, bias, src, ids_keep, sel, lid, pos_embed, patch_size, K):
    _check_values(src, ids_keep, patch_size, sel, lid)
    return _RegionTokens.apply(weight, bias, src, ids_keep.contiguous(),
                               None if sel is None else sel.contiguous(),
                               None if lid is None else lid.contiguous(), pos_embed, patch_size, K)


def region_tokens_from_labels(labels, scale_index, label_id, ids_keep, weight, bias, pos_embed,
                              patch_size, impl: str = "auto"):
    """Visible region tokens straight from label maps; region i of image b is
    ``labels[b, scale_index[b, i]] == label_id[b, i]`` (label_id -1 → all-zero map).

    Args:
        labels: [B, S, H, W] integer label maps (uint8, int16, int32, int64; uint16 where torch has it).
        scale_index: [B, k] int64 in [0, S); label_id: [B, k] int64 (>= -1).
        the rest as :func:`region_tokens`.

    Returns the same as ``region_tokens(labels_to_maps(labels, scale_index, label_id), ...)``; the
    Triton path compares labels while loading the visible patches (no binary maps are built).
    """
    B, S, H, W, K = check_label_regions(labels, scale_index, label_id)
    _validate_params(B, H, W, ids_keep, weight, bias, pos_embed, patch_size)
    check_same_device(labels=labels, scale_index=scale_index, label_id=label_id, ids_keep=ids_keep,
                      weight=weight, bias=bias, pos_embed=pos_embed)
    if not use_triton(impl, labels, scale_index, label_id, ids_keep, weight, bias, pos_embed,
                      fixed=_fixed_pos(pos_embed)):
        _check_values(labels, ids_keep, patch_size, scale_index, label_id)
        return region_tokens_from_labels_reference(labels, scale_index, label_id, ids_keep, weight,
                                                   bias, pos_embed, patch_size)
    return _region_tokens_triton(weight, bias, labels, ids_keep, scale_index, label_id, pos_embed, patch_size, K)
