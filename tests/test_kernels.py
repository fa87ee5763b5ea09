"""rmae.kernels: every Triton path (through TRITON_INTERPRET=1 on CPU) against its PyTorch reference.

Tolerances (stated once, used everywhere):
  * pure data movement (gather, scatter, fill) must be bit-exact (torch.equal);
  * fp32 arithmetic: rtol 1e-5, atol 1e-5;
  * bf16: rtol 1e-2, atol 1e-2 relative to the output scale (max |ref|), i.e. ~2-3 bf16 ulps — the
    Triton path accumulates in fp32 and rounds once, the reference rounds after each op;
  * fp16: rtol 2e-3, atol 2e-3 relative to the output scale, ~2 fp16 ulps, for the same reason.
Each random input comes from a seeded generator. ``poison_outputs()`` makes every buffer a launcher
allocates start as NaN, proving every output element (and every partial-sum slot) is written.
"""
import os

import pytest
import torch

from rmae.kernels import (
    gather_visible,
    gather_visible_reference,
    labels_to_maps,
    region_query_pool,
    region_query_pool_reference,
    region_tokens,
    region_tokens_from_labels,
    region_tokens_from_labels_reference,
    region_tokens_reference,
    unshuffle_fill,
    unshuffle_fill_reference,
    use_triton,
)
from rmae.kernels import region_embed as _re
from rmae.kernels import _dispatch as dispatch
from rmae.kernels._dispatch import poison_outputs

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels through Triton's CPU interpreter: TRITON_INTERPRET=1 (tests/conftest.py "
                "sets it unless the environment gives another value); tests/test_gpu.py runs them on a GPU",
                allow_module_level=True)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(a, b, dtype):
    """assert a ≈ b with the dtype's tolerance (atol scaled by the reference's magnitude)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    t = TOL[dtype]
    scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a.float(), b.float(), rtol=t["rtol"], atol=t["atol"] * scale)


def assert_grads_close(got, expected, dtype):
    """Gradients of the same inputs: None exactly where the reference has None, else close."""
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            close(a, b, dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, g, dtype=torch.float32, grad=False):
    t = torch.randn(shape, generator=g).to(dtype)
    return t.requires_grad_(grad)


def mask_ids(B, N, L, g):
    ids_shuffle = torch.rand(B, N, generator=g).argsort(dim=1)
    return ids_shuffle[:, :L].contiguous(), ids_shuffle.argsort(dim=1)


def grads(out, inputs, w):
    """d(sum(out·w))/d(inputs) for the inputs that require grad (None elsewhere)."""
    req = [t for t in inputs if t is not None and t.requires_grad]
    gs = iter(torch.autograd.grad((out.float() * w).sum(), req))
    return [next(gs) if (t is not None and t.requires_grad) else None for t in inputs]


def backward_name(t):
    return type(t.grad_fn).__name__


# ===================================================================================================
# dispatch
# ===================================================================================================
def test_dispatch_rules(monkeypatch):
    x = torch.zeros(2, 3)
    assert use_triton("auto", x)  # TRITON_INTERPRET=1
    assert not use_triton("reference", x)
    assert use_triton("triton", x)
    with pytest.raises(ValueError, match="impl must be one of"):
        use_triton("cuda", x)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert use_triton("auto", x)  # the kernels were built for the interpreter at import: that decides
    monkeypatch.setattr(dispatch, "_INTERPRETING", False)  # as if imported without TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set too late: jit has already chosen compiled kernels
    assert not use_triton("auto", x)  # CPU tensors, no interpreter → reference
    with pytest.raises(RuntimeError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        use_triton("triton", x)


def test_auto_picks_triton_under_interpreter_and_reference_without(monkeypatch):
    g = gen(0)
    x = randn((2, 16, 24), g, grad=True)
    ids, _ = mask_ids(2, 16, 5, g)
    assert backward_name(gather_visible(x, ids)[0]) == "_GatherVisibleBackward"
    assert backward_name(gather_visible(x, ids, impl="reference")[0]) == "GatherBackward0"
    monkeypatch.setattr(dispatch, "_INTERPRETING", False)
    assert backward_name(gather_visible(x, ids)[0]) == "GatherBackward0"
    assert backward_name(region_query_pool(x[:, None], impl="auto")) == "MeanBackward1"


# ===================================================================================================
# 1. gather_visible
# ===================================================================================================
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,with_regions", [(0, False), (1, True), (3, True)])
def test_gather_visible_matches_reference(dtype, k, with_regions):
    g = gen(1)
    B, N, L, C, Cr = 2, 20, 7, 24, 40
    x = randn((B, N, C), g, dtype, grad=True)
    r = randn((B, k, N, Cr), g, dtype, grad=True) if with_regions else None
    ids, _ = mask_ids(B, N, L, g)
    with poison_outputs():
        xv, rv = gather_visible(x, ids, r, impl="triton")
    xr, rr = gather_visible_reference(x, ids, r)
    assert torch.equal(xv, xr)
    assert backward_name(xv) == "_GatherVisibleBackward"
    if with_regions:
        assert torch.equal(rv, rr)
    else:
        assert rv is None
    wx = randn(xv.shape, g)
    wr = randn(rr.shape, g) if with_regions else None
    loss_t = (xv.float() * wx).sum() + ((rv.float() * wr).sum() if with_regions else 0)
    loss_r = (xr.float() * wx).sum() + ((rr.float() * wr).sum() if with_regions else 0)
    ins = [x, r] if with_regions else [x]
    with poison_outputs():
        gt = torch.autograd.grad(loss_t, ins)
    gr = torch.autograd.grad(loss_r, ins)
    for a, b in zip(gt, gr):
        assert torch.equal(a, b)
    # removed positions get exactly zero
    removed = torch.ones(B, N, dtype=torch.bool)
    removed.scatter_(1, ids, False)
    assert (gt[0][removed] == 0).all()


def test_gather_visible_strided_inputs_and_partial_grads():
    g = gen(2)
    B, N, L, C, Cr, k = 2, 16, 5, 24, 40, 3
    x_big = randn((B, N, 2 * C), g)
    x = x_big[:, :, ::2]  # non-contiguous view
    r = randn((B, N, k, Cr), g).permute(0, 2, 1, 3).requires_grad_(True)  # non-contiguous leaf
    ids, _ = mask_ids(B, N, L, g)
    xv, rv = gather_visible(x, ids, r, impl="triton")
    xr, rr = gather_visible_reference(x, ids, r)
    assert torch.equal(xv, xr) and torch.equal(rv, rr)
    w = randn(rv.shape, g)
    (gt,) = torch.autograd.grad((rv * w).sum(), [r])  # x needs no grad: only the region path runs
    (gref,) = torch.autograd.grad((rr * w).sum(), [r])
    assert torch.equal(gt, gref)


def test_gather_visible_keep_all_and_keep_one():
    g = gen(3)
    B, N, C = 2, 16, 24
    x = randn((B, N, C), g, grad=True)
    for L in (N, 1):
        ids, _ = mask_ids(B, N, L, g)
        xv, _ = gather_visible(x, ids, impl="triton")
        assert torch.equal(xv, gather_visible_reference(x, ids)[0])
        (gx,) = torch.autograd.grad(xv.sum(), [x])
        assert gx.sum().item() == B * L * C


def test_gather_visible_errors():
    g = gen(4)
    B, N, L, C = 2, 16, 5, 24
    x = randn((B, N, C), g)
    ids, _ = mask_ids(B, N, L, g)
    with pytest.raises(TypeError, match="int64"):
        gather_visible(x, ids.int())
    with pytest.raises(IndexError, match="out of range"):
        gather_visible(x, torch.full((B, L), N))
    with pytest.raises(IndexError, match="out of range"):
        gather_visible(x, torch.full((B, L), -1), impl="reference")
    dup = ids.clone()
    dup[:, 1] = dup[:, 0]
    with pytest.raises(ValueError, match="distinct"):
        gather_visible(x, dup, impl="triton")
    with pytest.raises(ValueError, match=r"regions must be \[B=2, k, N=16, Cr\]"):
        gather_visible(x, ids, randn((B, 2, N + 1, 8), g))
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        gather_visible(x[0], ids)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        gather_visible(x.int(), ids)
    with pytest.raises(RuntimeError, match="float64 runs on the reference"):
        gather_visible(x.double(), ids, impl="triton")
    with pytest.raises(ValueError, match="keeps L=17"):
        gather_visible(x, torch.zeros(B, N + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ids_keep must be \[B, L\]"):
        gather_visible(x, ids[:1])


# ===================================================================================================
# 2. unshuffle_fill
# ===================================================================================================
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,C", [(5, 24), (7, 130)])
@pytest.mark.parametrize("pos_trainable", [False, True])
def test_unshuffle_fill_matches_reference(dtype, L, C, pos_trainable):
    g = gen(10)
    B, N = 2, 20
    x = randn((B, L + 1, C), g, dtype, grad=True)
    mask_token = randn((1, 1, C), g, dtype, grad=True)
    pos = randn((1, N + 1, C), g, dtype, grad=pos_trainable)
    _, ids_restore = mask_ids(B, N, L, g)
    with poison_outputs():
        out = unshuffle_fill(x, mask_token, ids_restore, pos, impl="triton")
    ref = unshuffle_fill_reference(x, mask_token, ids_restore, pos)
    assert backward_name(out) == "_UnshuffleFillBackward"
    close(out, ref, dtype)
    w = randn(out.shape, g)
    ins = [x, mask_token, pos]
    with poison_outputs():
        gt = grads(out, ins, w)
    gr = grads(ref, ins, w)
    assert_grads_close(gt, gr, dtype)


def test_unshuffle_fill_mixed_dtypes_follow_reference_promotion():
    """bf16 activations (autocast) with an fp32 mask token and fp32 position buffer → fp32 output."""
    g = gen(11)
    B, N, L, C = 2, 16, 5, 24
    x = randn((B, L + 1, C), g, torch.bfloat16, grad=True)
    mask_token = randn((1, 1, C), g, grad=True)
    pos = randn((1, N + 1, C), g)
    _, ids_restore = mask_ids(B, N, L, g)
    out = unshuffle_fill(x, mask_token, ids_restore, pos, impl="triton")
    ref = unshuffle_fill_reference(x, mask_token, ids_restore, pos)
    assert out.dtype == ref.dtype == torch.float32
    close(out, ref, torch.float32)
    w = randn(out.shape, g)
    gt, gr = grads(out, [x, mask_token], w), grads(ref, [x, mask_token], w)
    assert gt[0].dtype == torch.bfloat16 and gt[1].dtype == torch.float32
    close(gt[0], gr[0], torch.bfloat16)
    close(gt[1], gr[1], torch.float32)


@pytest.mark.parametrize("L", [0, 16])
def test_unshuffle_fill_all_masked_and_none_masked(L):
    g = gen(12)
    B, N, C = 2, 16, 24
    x = randn((B, L + 1, C), g, grad=True)
    mask_token = randn((1, 1, C), g, grad=True)
    pos = randn((1, N + 1, C), g)
    _, ids_restore = mask_ids(B, N, L, g)
    with poison_outputs():
        out = unshuffle_fill(x, mask_token, ids_restore, pos, impl="triton")
    ref = unshuffle_fill_reference(x, mask_token, ids_restore, pos)
    close(out, ref, torch.float32)
    w = randn(out.shape, g)
    with poison_outputs():
        gt = grads(out, [x, mask_token], w)
    gr = grads(ref, [x, mask_token], w)
    for a, b in zip(gt, gr):
        close(a, b, torch.float32)


@pytest.mark.parametrize("bsplit", [1, 3, 5])
def test_unshuffle_fill_backward_batch_split(bsplit):
    """Batch slices of uneven size (B=5) each write their own partial sums; all are reduced."""
    from rmae.kernels import unshuffle as _un

    g = gen(14)
    B, N, L, C = 5, 16, 5, 24
    x = randn((B, L + 1, C), g, grad=True)
    m = randn((1, 1, C), g, grad=True)
    pos = randn((1, N + 1, C), g, grad=True)
    _, ids_restore = mask_ids(B, N, L, g)
    ref = unshuffle_fill_reference(x, m, ids_restore, pos)
    gout = randn(ref.shape, g)
    gr = torch.autograd.grad((ref * gout).sum(), [x, m, pos])
    with poison_outputs():
        gt = _un._launch_bwd(gout, ids_restore, L, x.dtype, m.dtype, pos.dtype, True, True, True, bsplit=bsplit)
    for a, b in zip(gt, gr):
        close(a, b, torch.float32)


def test_unshuffle_fill_empty_batch():
    g = gen(15)
    N, L, C = 16, 3, 8
    x = torch.zeros((0, L + 1, C), requires_grad=True)
    m, pos = randn((1, 1, C), g, grad=True), randn((1, N + 1, C), g, grad=True)
    ids_restore = torch.zeros((0, N), dtype=torch.int64)
    out = unshuffle_fill(x, m, ids_restore, pos, impl="triton")
    ref = unshuffle_fill_reference(x, m, ids_restore, pos)
    assert out.shape == ref.shape == (0, N + 1, C)
    gt = torch.autograd.grad(out.sum(), [x, m, pos])
    gr = torch.autograd.grad(ref.sum(), [x, m, pos])
    for a, b in zip(gt, gr):
        assert a.shape == b.shape and torch.equal(a, b)


def test_interpreter_switch_is_read_as_triton_reads_it():
    """TRITON_INTERPRET=true turns Triton's interpreter on; rmae must then take it for the interpreter too."""
    import subprocess
    import sys

    code = "from rmae.kernels import _dispatch as d; print(d.interpreting())"
    for value, expected in (("true", "True"), ("1", "True"), ("0", "False")):
        env = {**os.environ, "TRITON_INTERPRET": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)


def test_unshuffle_fill_errors():
    g = gen(13)
    B, N, L, C = 2, 16, 5, 24
    x = randn((B, L + 1, C), g)
    m = randn((1, 1, C), g)
    pos = randn((1, N + 1, C), g)
    _, ids_restore = mask_ids(B, N, L, g)
    bad = ids_restore.clone()
    bad[:, 0] = bad[:, 1]
    with pytest.raises(ValueError, match="permutation"):
        unshuffle_fill(x, m, bad, pos, impl="triton")
    with pytest.raises(IndexError, match="out of range"):
        unshuffle_fill(x, m, ids_restore + 1, pos)
    with pytest.raises(TypeError, match="int64"):
        unshuffle_fill(x, m, ids_restore.int(), pos)
    with pytest.raises(ValueError, match=r"pos_embed must be \[1, N\+1=17, C=24\]"):
        unshuffle_fill(x, m, ids_restore, pos[:, 1:])
    with pytest.raises(ValueError, match=r"mask_token must be \[1, 1, C=24\]"):
        unshuffle_fill(x, m[..., :-1], ids_restore, pos)
    with pytest.raises(ValueError, match="only N=16"):
        unshuffle_fill(randn((B, N + 2, C), g), m, ids_restore, pos)


# ===================================================================================================
# 3. region_query_pool
# ===================================================================================================
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,L,C", [(1, 5, 24), (3, 7, 130)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_region_query_pool_matches_reference(dtype, k, L, C, with_residual):
    g = gen(20)
    B = 2
    x = randn((B, k, L, C), g, dtype, grad=True)
    res = randn((B, k, L, C), g, dtype, grad=True) if with_residual else None
    with poison_outputs():
        out = region_query_pool(x, res, impl="triton")
    ref = region_query_pool_reference(x, res)
    assert backward_name(out) == "_RegionQueryPoolBackward"
    close(out, ref, dtype)
    w = randn(out.shape, g)
    ins = [x, res]
    with poison_outputs():
        gt = grads(out, ins, w)
    gr = grads(ref, ins, w)
    assert_grads_close(gt, gr, dtype)
    if with_residual:  # two distinct gradient buffers (no aliasing between the inputs' grads)
        assert gt[0].data_ptr() != gt[1].data_ptr()


def test_region_query_pool_residual_without_grad_and_strided():
    g = gen(21)
    B, k, L, C = 2, 3, 5, 24
    x = randn((B, L, k, C), g).transpose(1, 2).requires_grad_(True)
    res = randn((B, k, L, C), g)  # no grad
    out = region_query_pool(x, res, impl="triton")
    ref = region_query_pool_reference(x, res)
    close(out, ref, torch.float32)
    w = randn(out.shape, g)
    close(grads(out, [x], w)[0], grads(ref, [x], w)[0], torch.float32)


def test_region_query_pool_errors():
    g = gen(22)
    x = randn((2, 3, 5, 24), g)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        region_query_pool(x, x[:, :, :4])
    with pytest.raises(ValueError, match=r"\[B, k, L, C\]"):
        region_query_pool(x[0])
    with pytest.raises(ValueError, match="L >= 1"):
        region_query_pool(x[:, :, :0])
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        region_query_pool(x.long())


# ===================================================================================================
# 4. region_tokens / region_tokens_from_labels
# ===================================================================================================
def region_params(D, P, Hp, Wp, g, dtype=torch.float32):
    w = (randn((D, 1, P, P), g) * 0.5).to(dtype).requires_grad_(True)
    b = randn((D,), g, dtype, grad=True)
    pos = randn((1, Hp * Wp, D), g, dtype)
    return w, b, pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,L,D,P,Hp,Wp,map_dtype", [
    (1, 5, 24, 4, 4, 4, torch.uint8),
    (3, 7, 40, 4, 4, 5, torch.bool),
    (2, 6, 130, 3, 3, 4, torch.uint8),   # p·p = 9 < one k-block, D over two d-blocks
    (2, 3, 24, 16, 2, 2, torch.uint8),   # ViT-B's patch: p·p = 256, four k-blocks
    (1, 3, 24, 14, 2, 2, torch.bool),    # ViT-H's patch: p·p = 196, the last k-block partial
])
def test_region_tokens_matches_reference(dtype, k, L, D, P, Hp, Wp, map_dtype):
    g = gen(30)
    B = 2
    maps = (torch.rand((B, k, Hp * P, Wp * P), generator=g) < 0.4).to(map_dtype)
    maps[0, 0] = 0  # an empty region
    ids, _ = mask_ids(B, Hp * Wp, L, g)
    w, b, pos = region_params(D, P, Hp, Wp, g, dtype)
    with poison_outputs():
        out = region_tokens(maps, ids, w, b, pos, P, impl="triton")
    ref = region_tokens_reference(maps, ids, w, b, pos, P)
    assert out.shape == (B, k, L, D)
    assert backward_name(out) == "_RegionTokensBackward"
    close(out, ref, dtype)
    gw = randn(out.shape, g)
    with poison_outputs():
        gt = grads(out, [w, b], gw)
    gr = grads(ref, [w, b], gw)
    for a, c in zip(gt, gr):
        close(a, c, dtype)


@pytest.mark.parametrize("split", [1, 3])
def test_region_tokens_backward_split_m(split):
    """Weight/bias grads: each split loops over several row blocks, and a split with no rows writes zeros."""
    g = gen(31)
    B, k, L, D, P, Hp, Wp = 2, 3, 20, 24, 4, 5, 5
    maps = (torch.rand((B, k, Hp * P, Wp * P), generator=g) < 0.5).to(torch.uint8)
    ids, _ = mask_ids(B, Hp * Wp, L, g)
    w, b, pos = region_params(D, P, Hp, Wp, g)
    ref = region_tokens_reference(maps, ids, w, b, pos, P)
    gout = randn(ref.shape, g)
    gw_ref, gb_ref = torch.autograd.grad((ref * gout).sum(), [w, b])
    with poison_outputs():
        gw, gb = _re._launch_bwd(gout, maps, ids, None, None, P, k, w.dtype, b.dtype, True, True,
                                 split=split)
    close(gw, gw_ref, torch.float32)
    close(gb, gb_ref, torch.float32)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64]
                         + ([torch.uint16] if hasattr(torch, "uint16") else []))
def test_region_tokens_from_labels_matches_maps(label_dtype):
    g = gen(32)
    B, S, k, L, D, P, Hp, Wp = 2, 3, 3, 7, 40, 4, 4, 5
    labels = torch.randint(0, 5, (B, S, Hp * P, Wp * P), generator=g).to(label_dtype)
    scale_index = torch.randint(0, S, (B, k), generator=g)
    label_id = torch.randint(0, 5, (B, k), generator=g)
    label_id[0, 1] = -1  # empty region
    label_id[1, 0] = 7  # a label not present → empty too
    if label_dtype in (torch.int16, torch.int32, torch.int64):
        labels[0, 0, :2] = 300  # beyond uint8: no wrap-around
        label_id[0, 2], scale_index[0, 2] = 300, 0
    ids, _ = mask_ids(B, Hp * Wp, L, g)
    w, b, pos = region_params(D, P, Hp, Wp, g)
    with poison_outputs():
        out = region_tokens_from_labels(labels, scale_index, label_id, ids, w, b, pos, P, impl="triton")
    maps = labels_to_maps(labels, scale_index, label_id)
    assert maps[0, 1].sum() == 0 and maps[1, 0].sum() == 0 and maps.any()
    via_maps = region_tokens(maps, ids, w, b, pos, P, impl="triton")
    ref = region_tokens_from_labels_reference(labels, scale_index, label_id, ids, w, b, pos, P)
    assert torch.equal(out, via_maps)
    close(out, ref, torch.float32)
    assert torch.equal(region_tokens_from_labels(labels, scale_index, label_id, ids, w, b, pos, P, impl="reference"),
                       region_tokens_reference(maps, ids, w, b, pos, P))
    gout = randn(out.shape, g)
    gt, gr = grads(out, [w, b], gout), grads(ref, [w, b], gout)
    for a, c in zip(gt, gr):
        close(a, c, torch.float32)


def test_region_tokens_errors():
    g = gen(33)
    B, k, L, D, P, Hp, Wp = 2, 3, 5, 24, 4, 4, 4
    maps = torch.zeros((B, k, Hp * P, Wp * P), dtype=torch.uint8)
    ids, _ = mask_ids(B, Hp * Wp, L, g)
    w, b, pos = region_params(D, P, Hp, Wp, g)
    with pytest.raises(TypeError, match="uint8 or bool"):
        region_tokens(maps.float(), ids, w, b, pos, P)
    with pytest.raises(ValueError, match=r"maps must be \[B, k, H, W\]"):
        region_tokens(maps[0], ids, w, b, pos, P)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        region_tokens(maps[..., :-1], ids, w, b, pos, P)
    with pytest.raises(ValueError, match=r"weight must be \[D, 1, 4, 4\]"):
        region_tokens(maps, ids, w[..., :-1], b, pos, P)
    with pytest.raises(ValueError, match=r"pos_embed must be \[1, N=16, D=24\]"):
        region_tokens(maps, ids, w, b, pos[:, 1:], P)
    with pytest.raises(IndexError, match="out of range"):
        region_tokens(maps, torch.full((B, L), Hp * Wp), w, b, pos, P)
    with pytest.raises(TypeError, match="int64"):
        region_tokens(maps, ids.int(), w, b, pos, P)
    with pytest.raises(ValueError, match="fixed sin-cos"):
        region_tokens(maps, ids, w, b, pos.clone().requires_grad_(True), P, impl="triton")
    labels = torch.zeros((B, 2, Hp * P, Wp * P), dtype=torch.int32)
    si = torch.zeros((B, k), dtype=torch.int64)
    li = torch.zeros((B, k), dtype=torch.int64)
    with pytest.raises(TypeError, match="integer label map"):
        region_tokens_from_labels(labels.float(), si, li, ids, w, b, pos, P)
    with pytest.raises(IndexError, match="scale_index out of range"):
        region_tokens_from_labels(labels, si + 2, li, ids, w, b, pos, P)
    with pytest.raises(ValueError, match=">= -1"):
        region_tokens_from_labels(labels, si, li - 2, ids, w, b, pos, P)
    with pytest.raises(ValueError, match=r"label_id must be \[B, k\]"):
        region_tokens_from_labels(labels, si, li[:, :1], ids, w, b, pos, P)


# ===================================================================================================
# torch.compile: the Triton paths are opaque calls (graph breaks), the rest of the graph compiles
# ===================================================================================================
def test_triton_paths_under_torch_compile():
    g = gen(40)
    B, N, L, C, k, D, P, Hp = 2, 16, 5, 24, 3, 24, 4, 4
    x = randn((B, N, C), g, grad=True)
    m = randn((1, 1, C), g, grad=True)
    pos = randn((1, N + 1, C), g)
    ids_keep, ids_restore = mask_ids(B, N, L, g)
    maps = (torch.rand((B, k, Hp * P, Hp * P), generator=g) < 0.5).to(torch.uint8)
    w, b, rpos = region_params(D, P, Hp, Hp, g)

    def f(x, m, w, b, impl):
        xv, _ = gather_visible(x * 2, ids_keep, impl=impl)
        dec = unshuffle_fill(torch.cat([xv[:, :1], xv], 1), m, ids_restore, pos, impl=impl)
        tok = region_tokens(maps, ids_keep, w, b, rpos, P, impl=impl)
        q = region_query_pool(tok.sin(), tok, impl=impl)
        return dec.square().mean() + q.cos().mean()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=False)
    ins = [x, m, w, b]
    out_c = compiled(x, m, w, b, "triton")
    gc = torch.autograd.grad(out_c, ins)
    out_r = f(x, m, w, b, "reference")
    gr = torch.autograd.grad(out_r, ins)
    close(out_c, out_r, torch.float32)
    for a, c in zip(gc, gr):
        close(a, c, torch.float32)


def test_turning_index_checks_off_keeps_compiled_code():
    """rmae.train checks the first update's indices, then turns the checks off: a compiled model that read the
    setting while tracing recompiled every frame at the second update (a guard on the module global)."""
    from torch._dynamo.testing import CompileCounter

    from rmae.kernels import set_index_checks

    g = gen(41)
    x = randn((2, 16, 8), g)
    ids_keep, _ = mask_ids(2, 16, 5, g)
    counter = CompileCounter()
    compiled = torch.compile(lambda x, ids: gather_visible(x * 2, ids, impl="reference")[0].sum(), backend=counter)
    torch._dynamo.reset()
    try:
        set_index_checks(True)
        first = compiled(x, ids_keep)
        frames = counter.frame_count
        set_index_checks(False)
        second = compiled(x, ids_keep)
    finally:
        set_index_checks(None)
    assert frames >= 1 and torch.equal(first, second)
    assert counter.frame_count == frames  # nothing recompiled after the checks were turned off


# ===================================================================================================
# 5 (stretch, partial). region_bce_loss: targets read from the maps / labels, no float target tensor
# ===================================================================================================
from rmae.kernels import region_bce_loss, region_bce_loss_from_labels, region_bce_loss_reference  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,P,Hp,Wp,bg", [(1, 4, 4, 4, 1.0), (3, 4, 4, 5, 0.3), (2, 3, 3, 4, 2.0)])
def test_region_bce_loss_matches_reference(dtype, k, P, Hp, Wp, bg):
    g = gen(50)
    B, N = 2, Hp * Wp
    maps = (torch.rand((B, k, Hp * P, Wp * P), generator=g) < 0.4).to(torch.uint8)
    logits = (randn((B, k, N, P * P), g) * 3).to(dtype).requires_grad_(True)
    mask = (torch.rand((B, N), generator=g) < 0.7).float()
    with poison_outputs():
        out = region_bce_loss(logits, maps, mask, P, bg, impl="triton")
    ref = region_bce_loss_reference(logits, maps, mask, P, bg)
    assert backward_name(out) == "_RegionBCEBackward"
    assert out.dtype == ref.dtype == torch.float32
    close(out, ref, torch.float32)  # both compute in fp32 from the same (bf16) logits
    with poison_outputs():
        (gt,) = torch.autograd.grad(out * 1.7, [logits])
    (gr,) = torch.autograd.grad(ref * 1.7, [logits])
    # relative to the gradient's scale: every element is ~1/(B·k·N·p²); bf16: both round an fp32 value once, so
    # they differ by at most one bf16 ulp (2^-8 relative)
    assert gt.dtype == dtype
    t = TOL[dtype] if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-8)
    torch.testing.assert_close(gt.float(), gr.float(), rtol=t["rtol"], atol=t["atol"] * gr.abs().max().item())
    # masked-out patches get exactly zero gradient
    assert (gt.float()[(mask == 0)[:, None].expand(-1, k, -1)] == 0).all()


def test_region_bce_loss_from_labels_matches_maps():
    g = gen(51)
    B, S, k, P, Hp, Wp = 2, 3, 3, 4, 4, 5
    N = Hp * Wp
    labels = torch.randint(0, 5, (B, S, Hp * P, Wp * P), generator=g).to(torch.int16)
    scale_index = torch.randint(0, S, (B, k), generator=g)
    label_id = torch.randint(-1, 5, (B, k), generator=g)
    label_id[0, 0] = -1
    logits = randn((B, k, N, P * P), g, grad=True)
    mask = (torch.rand((B, N), generator=g) < 0.7).float()
    maps = labels_to_maps(labels, scale_index, label_id)
    out = region_bce_loss_from_labels(logits, labels, scale_index, label_id, mask, P, 0.5, impl="triton")
    via_maps = region_bce_loss(logits, maps, mask, P, 0.5, impl="triton")
    ref = region_bce_loss_reference(logits, maps, mask, P, 0.5)
    close(out, via_maps, torch.float32)
    close(out, ref, torch.float32)
    (gt,) = torch.autograd.grad(out, [logits])
    (gr,) = torch.autograd.grad(ref, [logits])
    torch.testing.assert_close(gt, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item())


def test_unchecked_scale_index_out_of_range_reads_an_empty_region():
    """With the index checks off (rmae.train after its first update) a scale index outside [0, S) from the data
    makes its region empty on the Triton paths (no out-of-bounds read): the result equals the reference's with
    label_id -1 there. With the checks on it is an IndexError."""
    g = gen(53)
    B, S, k, L, D, P, Hp, Wp = 2, 2, 3, 5, 24, 4, 3, 4
    N = Hp * Wp
    labels = torch.randint(0, 4, (B, S, Hp * P, Wp * P), generator=g).to(torch.int16)
    scale_index = torch.tensor([[0, 2, 1], [-1, 1, 5]])
    label_id = torch.randint(0, 4, (B, k), generator=g)
    outside = (scale_index < 0) | (scale_index >= S)
    as_empty = (torch.where(outside, 0, scale_index), torch.where(outside, -1, label_id))
    ids, _ = mask_ids(B, N, L, g)
    w, b, pos = region_params(D, P, Hp, Wp, g)
    logits, mask = randn((B, k, N, P * P), g, grad=True), (torch.rand((B, N), generator=g) < 0.7).float()
    with pytest.raises(IndexError, match="scale_index out of range"):
        region_tokens_from_labels(labels, scale_index, label_id, ids, w, b, pos, P, impl="triton")
    with pytest.raises(IndexError, match="scale_index out of range"):
        region_bce_loss_from_labels(logits, labels, scale_index, label_id, mask, P, impl="triton")
    dispatch.set_index_checks(False)
    try:
        tokens = region_tokens_from_labels(labels, scale_index, label_id, ids, w, b, pos, P, impl="triton")
        loss = region_bce_loss_from_labels(logits, labels, scale_index, label_id, mask, P, impl="triton")
    finally:
        dispatch.set_index_checks(None)
    close(tokens, region_tokens_from_labels_reference(labels, *as_empty, ids, w, b, pos, P), torch.float32)
    close(loss, region_bce_loss_reference(logits, labels_to_maps(labels, *as_empty), mask, P), torch.float32)
    (grad_w,) = torch.autograd.grad((tokens * tokens).sum(), [w])
    (grad_w_ref,) = torch.autograd.grad(
        (region_tokens_from_labels_reference(labels, *as_empty, ids, w, b, pos, P) ** 2).sum(), [w])
    close(grad_w, grad_w_ref, torch.float32)


def test_auto_runs_calls_that_want_a_fixed_tables_gradient_on_the_reference():
    """pos_embed (region tokens) and region_mask (region loss) are fixed inputs for the kernels: impl="auto" runs a
    call that wants their gradient (a model.requires_grad_(True), say) on the reference, as it would on a CPU;
    impl="triton" refuses it."""
    g = gen(54)
    B, k, L, D, P, Hp, Wp = 2, 2, 4, 16, 4, 3, 3
    N = Hp * Wp
    maps = (torch.rand((B, k, Hp * P, Wp * P), generator=g) < 0.5).to(torch.uint8)
    ids, _ = mask_ids(B, N, L, g)
    w, b, pos = region_params(D, P, Hp, Wp, g)
    pos.requires_grad_(True)
    assert use_triton("auto", maps, ids, w, b, pos)  # the interpreter: the kernels unless the gradient is wanted
    out = region_tokens(maps, ids, w, b, pos, P, impl="auto")
    assert backward_name(out) != "_RegionTokensBackward"
    (grad_pos,) = torch.autograd.grad(out.sum(), [pos])
    close(grad_pos, torch.autograd.grad(region_tokens_reference(maps, ids, w, b, pos, P).sum(), [pos])[0],
          torch.float32)
    with pytest.raises(ValueError, match="pos_embed must not require grad in the Triton path"):
        region_tokens(maps, ids, w, b, pos, P, impl="triton")
    with torch.no_grad():  # no gradient wanted: the kernels
        assert torch.equal(region_tokens(maps, ids, w, b, pos, P, impl="auto"),
                           region_tokens(maps, ids, w, b, pos.detach(), P, impl="triton"))
    logits = randn((B, k, N, P * P), g, grad=True)
    mask = (torch.rand((B, N), generator=g) < 0.7).float().requires_grad_(True)
    loss = region_bce_loss(logits, maps, mask, P, impl="auto")
    assert backward_name(loss) != "_RegionBCEBackward"
    assert torch.autograd.grad(loss, [mask])[0].shape == (B, N)
    with pytest.raises(ValueError, match="region_mask must not require grad in the Triton path"):
        region_bce_loss(logits, maps, mask, P, impl="triton")


def test_region_bce_loss_errors():
    g = gen(52)
    B, k, P, Hp = 2, 3, 4, 4
    N = Hp * Hp
    maps = torch.zeros((B, k, Hp * P, Hp * P), dtype=torch.uint8)
    logits = randn((B, k, N, P * P), g)
    mask = torch.ones(B, N)
    with pytest.raises(TypeError, match="uint8 or bool"):
        region_bce_loss(logits, maps.float(), mask, P)
    with pytest.raises(ValueError, match=r"logits must be \[B=2, k=3, N=16, p\*p=16\]"):
        region_bce_loss(logits[:, :, 1:], maps, mask, P)
    with pytest.raises(ValueError, match=r"region_mask must be \[B=2, N=16\]"):
        region_bce_loss(logits, maps, mask[:, 1:], P)
    with pytest.raises(ValueError, match="dividing the map size"):
        region_bce_loss(logits, maps, mask, 5)
    with pytest.raises(ValueError, match="region_mask must not require grad"):
        region_bce_loss(logits, maps, mask.clone().requires_grad_(True), P, impl="triton")
    labels = torch.zeros((B, 2, Hp * P, Hp * P), dtype=torch.int32)
    si = torch.zeros((B, k), dtype=torch.int64)
    with pytest.raises(IndexError, match="scale_index out of range"):
        region_bce_loss_from_labels(logits, labels, si + 2, si, mask, P, impl="triton")


# ===================================================================================================
# float64: the reference path under impl='auto' (model.double(), gradcheck)
# ===================================================================================================
def test_float64_inputs_take_the_reference_and_pass_gradcheck():
    g = gen(60)
    B, N, L, k, C, P, Hp, Wp = 2, 6, 3, 2, 5, 2, 2, 3
    ids, restore = mask_ids(B, N, L, g)
    x, regions = randn((B, N, C), g, torch.float64, True), randn((B, k, N, 4), g, torch.float64, True)
    out = gather_visible(x, ids, regions)
    assert out[0].dtype == torch.float64 and backward_name(out[0]) != "_GatherVisibleBackward"
    assert torch.autograd.gradcheck(lambda a, r: gather_visible(a, ids, r), (x, regions))
    tokens, token = randn((B, 1 + L, C), g, torch.float64, True), randn((1, 1, C), g, torch.float64, True)
    pos = randn((1, N + 1, C), g, torch.float64, True)
    assert torch.autograd.gradcheck(lambda a, t, p: unshuffle_fill(a, t, restore, p), (tokens, token, pos))
    pooled, residual = randn((B, k, L, C), g, torch.float64, True), randn((B, k, L, C), g, torch.float64, True)
    assert torch.autograd.gradcheck(region_query_pool, (pooled, residual))
    labels = torch.randint(0, 3, (B, 2, Hp * P, Wp * P), generator=g).to(torch.int16)
    scale_index, label_id = torch.randint(0, 2, (B, k), generator=g), torch.randint(0, 3, (B, k), generator=g)
    w, b, pos = (t.double().detach().requires_grad_(True) for t in region_params(C, P, Hp, Wp, g))
    assert torch.autograd.gradcheck(
        lambda w_, b_: region_tokens_from_labels(labels, scale_index, label_id, ids, w_, b_, pos, P), (w, b))
    logits, mask = randn((B, k, N, P * P), g, torch.float64, True), (torch.rand((B, N), generator=g) < 0.7).double()
    loss = region_bce_loss_from_labels(logits, labels, scale_index, label_id, mask, P, 0.3)
    assert loss.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda z: region_bce_loss_from_labels(z, labels, scale_index, label_id, mask, P, 0.3), (logits,))


# ===================================================================================================
# what every path shares: no double backward, binary maps, the GPUs "auto" runs on
# ===================================================================================================
def test_second_derivatives_through_the_triton_paths_raise():
    """The kernels' backwards are not differentiable: a gradient taken with create_graph=True and differentiated
    again raises (it was silently a constant, so a gradient penalty lost its second-order term)."""
    g = gen(70)
    B, N, L, k, C, P, Hp, Wp = 2, 6, 3, 2, 8, 2, 2, 3
    ids, restore = mask_ids(B, N, L, g)
    x, regions = randn((B, N, C), g, grad=True), randn((B, k, N, 4), g, grad=True)
    tokens, token, pos = randn((B, 1 + L, C), g, grad=True), randn((1, 1, C), g, grad=True), randn((1, N + 1, C), g)
    pooled = randn((B, k, L, C), g, grad=True)
    w, b, pos_r = region_params(C, P, Hp, Wp, g)
    maps = (torch.rand((B, k, Hp * P, Wp * P), generator=g) < 0.5).to(torch.uint8)
    logits, mask = randn((B, k, N, P * P), g, grad=True), torch.ones(B, N)
    calls = {
        "gather_visible": (lambda: gather_visible(x, ids, regions)[1], [regions]),
        "unshuffle_fill": (lambda: unshuffle_fill(tokens, token, restore, pos), [tokens, token]),
        "region_query_pool": (lambda: region_query_pool(pooled), [pooled]),
        "region_tokens": (lambda: region_tokens(maps, ids, w, b, pos_r, P), [w, b]),
        "region_bce_loss": (lambda: region_bce_loss(logits, maps, mask, P, 0.5), [logits]),
    }
    for name, (call, inputs) in calls.items():
        out = call()
        assert not backward_name(out).startswith(("Gather", "Mean", "Add", "Cat", "Binary")), name  # Triton's
        first = torch.autograd.grad(out.float().square().sum(), inputs, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            sum(f.float().sum() for f in first).backward()


def test_maps_must_be_binary():
    """uint8 maps hold 0 and 1: a 0/255 mask is refused on both paths (both take the byte's value as it is),
    unless the index checks are off; bool maps need no check."""
    g = gen(71)
    B, k, L, D, P, Hp, Wp = 2, 2, 3, 8, 2, 2, 3
    N = Hp * Wp
    maps = (torch.rand((B, k, Hp * P, Wp * P), generator=g) < 0.5).to(torch.uint8) * 255
    ids, _ = mask_ids(B, N, L, g)
    w, b, pos = region_params(D, P, Hp, Wp, g)
    logits, mask = randn((B, k, N, P * P), g), torch.ones(B, N)
    for impl in ("triton", "reference"):
        with pytest.raises(ValueError, match="values 0/1, got values up to 255.*maps != 0"):
            region_tokens(maps, ids, w, b, pos, P, impl=impl)
        with pytest.raises(ValueError, match="values 0/1, got values up to 255"):
            region_bce_loss(logits, maps, mask, P, impl=impl)
        region_tokens(maps != 0, ids, w, b, pos, P, impl=impl)
        region_bce_loss(logits, (maps != 0).to(torch.uint8), mask, P, impl=impl)
    dispatch.set_index_checks(False)
    try:  # unchecked (no host sync): the kernels take the values as the reference does
        for bg_weight in (1.0, 0.5):
            torch.testing.assert_close(region_bce_loss(logits, maps, mask, P, bg_weight, impl="triton"),
                                       region_bce_loss_reference(logits, maps, mask, P, bg_weight))
        close(region_tokens(maps, ids, w, b, pos, P, impl="triton"), region_tokens_reference(maps, ids, w, b, pos, P),
              torch.float32)
    finally:
        dispatch.set_index_checks(None)


class _OnGpu:
    """Stands in for a CUDA tensor in use_triton (which reads dtype, is_cuda and device)."""
    dtype, is_cuda, device = torch.float32, True, torch.device("cuda", 0)


@pytest.mark.parametrize("capability, hip, picked", [((9, 0), None, True), ((8, 0), None, True),
                                                     ((7, 5), None, False), ((9, 4), "6.2", False)])
def test_auto_runs_the_kernels_on_ampere_or_newer_nvidia_gpus(monkeypatch, capability, hip, picked):
    """``impl="auto"`` takes the kernels on NVIDIA GPUs of compute capability 8.0+ (bfloat16 and tf32 dots; what
    they are tested on) and the reference on older cards and ROCm; ``impl="triton"`` still forces them."""
    monkeypatch.setattr(dispatch, "_INTERPRETING", False)
    monkeypatch.setattr(dispatch, "_KERNEL_GPUS", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert use_triton("auto", _OnGpu(), _OnGpu()) is picked
    assert use_triton("triton", _OnGpu()) and not use_triton("reference", _OnGpu())
