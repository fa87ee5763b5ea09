"""Faithfulness tests for rmae.models (CPU, tiny shapes).

The expected parameter names below are written from the project's design notes, "Model" (the official facebookresearch/r-mae
names), not generated from the model. ``official_forward`` is an independent, straightforward transcription of
the official forward (full-length region tokens then gather, explicit softmax attention, expansion over N+1 then
drop cls) that reuses only the model's weights.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmae.models import (RMAE, RegionLabels, VisionTransformer, build_model, export_encoder, rmae_base_patch16,
                         rmae_tiny_patch16)
from rmae import kernels

IMG, P = 32, 8  # N = 16 patches
N = (IMG // P) ** 2
K = 8


def tiny(variant="rmae", **kw):
    kw.setdefault("img_size", IMG)
    kw.setdefault("patch_size", P)
    kw.setdefault("depth", 2)
    return build_model("rmae_tiny_patch16", variant, **kw)


def inputs(B=2, seed=0, k=K):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(B, 3, IMG, IMG, generator=g)
    # FH-like label maps at 2 scales: blocky integer labels
    S = 2
    coarse = torch.randint(0, 5, (B, S, IMG // 4, IMG // 4), generator=g)
    labels = coarse.repeat_interleave(4, 2).repeat_interleave(4, 3).to(torch.int32)
    scale_index = torch.randint(0, S, (B, k), generator=g)
    label_id = torch.randint(0, 5, (B, k), generator=g)
    label_id[0, -1] = -1  # an all-zero region
    rl = RegionLabels(labels, scale_index, label_id)
    maps = rl.to_maps().to(torch.uint8)
    noise = torch.rand(B, N, generator=g)
    return imgs, maps, rl, noise


# ----------------------------------------------------------------------------- expected names (design notes)
def _block_keys(prefix, dim, mlp_hidden):
    shapes = {
        "norm1.weight": [dim], "norm1.bias": [dim],
        "attn.qkv.weight": [3 * dim, dim], "attn.qkv.bias": [3 * dim],
        "attn.proj.weight": [dim, dim], "attn.proj.bias": [dim],
        "norm2.weight": [dim], "norm2.bias": [dim],
        "mlp.fc1.weight": [mlp_hidden, dim], "mlp.fc1.bias": [mlp_hidden],
        "mlp.fc2.weight": [dim, mlp_hidden], "mlp.fc2.bias": [dim],
    }
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def expected_encoder(D=768, depth=12, n=196, p=16):
    e = {"cls_token": [1, 1, D], "pos_embed": [1, n + 1, D],
         "patch_embed.proj.weight": [D, 3, p, p], "patch_embed.proj.bias": [D],
         "norm.weight": [D], "norm.bias": [D]}
    for i in range(depth):
        e.update(_block_keys(f"blocks.{i}", D, 4 * D))
    return e


def expected_pixel_decoder(D=768, Dd=512, depth=8, n=196, p=16):
    e = {"decoder_embed.weight": [Dd, D], "decoder_embed.bias": [Dd], "mask_token": [1, 1, Dd],
         "decoder_pos_embed": [1, n + 1, Dd], "decoder_norm.weight": [Dd], "decoder_norm.bias": [Dd],
         "decoder_pred.weight": [p * p * 3, Dd], "decoder_pred.bias": [p * p * 3]}
    for i in range(depth):
        e.update(_block_keys(f"decoder_blocks.{i}", Dd, 4 * Dd))
    return e


def expected_region(D=768, R=128, neck=8, n=196, p=16):
    e = {"region_patch_embed.proj.weight": [R, 1, p, p], "region_patch_embed.proj.bias": [R],
         "region_pos_embed": [1, n + 1, R],  # official stores a zero cls row; rows 1: are used
         "region_proj.0.weight": [R], "region_proj.0.bias": [R],
         "region_proj.1.weight": [R, R], "region_proj.1.bias": [R],
         "region_cross_embed.weight": [R, D], "region_cross_embed.bias": [R],
         "region_cross_mask_token": [1, 1, R], "region_cross_pos_embed": [1, n + 1, R],
         "region_dec_norm.weight": [R], "region_dec_norm.bias": [R],
         "region_pred.1.weight": [p * p, R], "region_pred.1.bias": [p * p]}
    e.update(_block_keys("region_enc_blocks.0", R, 4 * R))
    for i in range(neck):
        e.update(_block_keys(f"region_cross_blocks.{i}", R, 4 * R))
    d = "region_dec_blocks.0"
    e.update({f"{d}.norm1.weight": [R], f"{d}.norm1.bias": [R],
              f"{d}.attn.qkv.weight": [3 * R, R], f"{d}.attn.qkv.bias": [3 * R],
              f"{d}.attn.proj.weight": [R, R], f"{d}.attn.proj.bias": [R],
              f"{d}.proj.weight": [R, R], f"{d}.proj.bias": [R],
              f"{d}.norm3.weight": [R], f"{d}.norm3.bias": [R],
              f"{d}.mlp.fc1.weight": [R, R], f"{d}.mlp.fc1.bias": [R],
              f"{d}.mlp.fc2.weight": [R, R], f"{d}.mlp.fc2.bias": [R]})
    return e


def _shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["rmae", "mae", "rae"])
def test_base_state_dict_matches_official_names(variant):
    with torch.device("meta"):
        model = rmae_base_patch16(variant)
    expected = expected_encoder()
    if variant in ("rmae", "mae"):
        expected.update(expected_pixel_decoder())
    if variant in ("rmae", "rae"):
        expected.update(expected_region())
    got = _shapes(model)
    assert sorted(got) == sorted(expected), (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    assert got == expected
    # fixed tables are frozen parameters (as the official nn.Parameter(requires_grad=False))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {k for k in expected if k.endswith("pos_embed")}
    assert model.num_region == (0 if variant == "mae" else 8)


def test_large_huge_shapes():
    with torch.device("meta"):
        large = build_model("rmae_large_patch16", "rmae")
        huge = build_model("rmae_huge_patch14", "rmae")
    assert list(large.pos_embed.shape) == [1, 197, 1024] and len(large.blocks) == 24
    assert list(huge.pos_embed.shape) == [1, 257, 1280] and len(huge.blocks) == 32
    assert list(huge.region_pred[1].weight.shape) == [14 * 14, 128]
    assert list(huge.decoder_pred.weight.shape) == [14 * 14 * 3, 512]


# ----------------------------------------------------------------------------- init
def sincos_table(dim, grid):
    """MAE's fixed 2-D table [1 + grid², dim], computed independently: cls row zeros, then per patch
    (row i, column j) sin/cos of the column index, then sin/cos of the row index."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = [torch.zeros(dim, dtype=torch.float64)]
    for i in range(grid):
        for j in range(grid):
            rows.append(torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)]))
    return torch.stack(rows).float()


def test_init_and_sincos():
    torch.manual_seed(0)
    m = tiny()
    gs = IMG // P
    # all four fixed tables, by value, frozen: the encoder's, the pixel decoder's, the region tokens' and the
    # region neck's (each model reads its own copy; a zeroed one would lose the positions of one branch)
    for name in ("pos_embed", "decoder_pos_embed", "region_pos_embed", "region_cross_pos_embed"):
        table = getattr(m, name)
        assert not table.requires_grad, name
        assert list(table.shape) == [1, gs * gs + 1, table.shape[-1]], name
        torch.testing.assert_close(table[0], sincos_table(table.shape[-1], gs), msg=name)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            assert mod.eps == 1e-6 and torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    # xavier-uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out)), for every Linear and both patch-embed convs
    # viewed as matrices. Bounded by b, and filling it: with n >= 64 draws the largest |w| is above 0.9 b but
    # with probability 0.9^64 = 1e-3 (PyTorch's default init, bound 1/sqrt(fan_in), stays below 0.6 b on every
    # layer here), and the standard deviation is b / sqrt(3) within 25% (n >= 64)
    matrices = [(name, mod.weight, mod.bias) for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    matrices += [(name, conv.weight.view(conv.weight.shape[0], -1), None)
                 for name, conv in (("patch_embed", m.patch_embed.proj), ("region_patch_embed", m.region_patch_embed.proj))]
    for name, w, bias in matrices:
        fan_out, fan_in = w.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max() <= bound, name
        if w.numel() >= 64:
            assert w.abs().max() > 0.9 * bound, name
            assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.25, name
        assert bias is None or torch.all(bias == 0), name
    for t in (m.cls_token, m.mask_token, m.region_cross_mask_token):  # normal(std 0.02)
        assert abs(t.std().item() / 0.02 - 1) < 0.3 and abs(t.mean().item()) < 0.01, t.shape


# ----------------------------------------------------------------------------- independent reference
def _ln(mod, x):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, 1e-6)


def _attn(a, x):
    B, n, C = x.shape
    h = a.num_heads
    qkv = F.linear(x, a.qkv.weight, a.qkv.bias).reshape(B, n, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    att = torch.matmul(q * (C // h) ** -0.5, k.transpose(-2, -1)).softmax(dim=-1)
    return F.linear(torch.matmul(att, v).transpose(1, 2).reshape(B, n, C), a.proj.weight, a.proj.bias)


def _mlp(m, x):
    return F.linear(F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)


def _block(b, x):
    x = x + _attn(b.attn, _ln(b.norm1, x))
    return x + _mlp(b.mlp, _ln(b.norm2, x))


def _patchify(imgs, p):
    B, c, H, W = imgs.shape
    h = H // p
    x = imgs.reshape(B, c, h, p, h, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * h, p * p * c)


def _unshuffle(x, token, ids_restore, pos):
    mask_tokens = token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    return torch.cat([x[:, :1, :], x_], dim=1) + pos


def official_forward(m, imgs, region, noise, mask_ratio=0.75):
    """Transcription of facebookresearch/r-mae RegionQueryRMAE.forward with the model's weights."""
    p = m.patch_size
    B = imgs.shape[0]
    out = {}
    if m.num_region > 0:
        b, c, h, w = region.shape
        region = region.float().view(b * c, 1, h, w)
        target_region = _patchify(region, p).view(b, c, -1, p * p)
        pr = m.region_patch_embed.proj
        region = F.conv2d(region - 0.5, pr.weight, pr.bias, stride=p).flatten(2).transpose(1, 2)
        region = region.reshape(b, c, -1, m.region_enc_dim) + m.region_pos_embed[None, :, 1:, :]
    x = F.conv2d(imgs, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    x = x + m.pos_embed[:, 1:, :]
    n, D = x.shape[1], x.shape[2]
    len_keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, n)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1, :]).expand(B, -1, -1), x], dim=1)
    for blk in m.blocks:
        x = _block(blk, x)
    latent = _ln(m.norm, x)
    loss = 0.0
    if m.use_mae_loss:
        y = _unshuffle(F.linear(latent, m.decoder_embed.weight, m.decoder_embed.bias), m.mask_token, ids_restore,
                       m.decoder_pos_embed)
        for blk in m.decoder_blocks:
            y = _block(blk, y)
        pred = F.linear(_ln(m.decoder_norm, y), m.decoder_pred.weight, m.decoder_pred.bias)[:, 1:, :]
        target = _patchify(imgs, p)
        if m.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        mae_loss = ((pred - target) ** 2).mean(-1)
        mae_loss = (mae_loss * mask).sum() / mask.sum()
        out.update(pred=pred, mae_loss=mae_loss)
        loss = loss + m.mae_loss_weight * mae_loss
    if m.num_region > 0:
        len_rkeep = int(n * (1 - m.region_mask_ratio))
        rk = ids_shuffle[:, :len_rkeep].view(B, 1, -1, 1).expand(-1, m.num_region, -1, m.region_enc_dim)
        region_mask = torch.ones(B, n)
        region_mask[:, :len_rkeep] = 0
        region_mask = torch.gather(region_mask, 1, ids_restore)
        r = torch.gather(region, 2, rk).flatten(0, 1)
        for blk in m.region_enc_blocks:
            r = _block(blk, r)
        q = r.view(B, m.num_region, len_rkeep, -1).mean(dim=2)
        mem = _unshuffle(F.linear(latent, m.region_cross_embed.weight, m.region_cross_embed.bias),
                         m.region_cross_mask_token, ids_restore, m.region_cross_pos_embed)
        for blk in m.region_cross_blocks:
            mem = _block(blk, mem)
        mem = _ln(m.region_dec_norm, mem)
        q = F.linear(_ln(m.region_proj[0], q), m.region_proj[1].weight, m.region_proj[1].bias)
        for blk in m.region_dec_blocks[:-1]:
            q = q + _attn(blk.attn, _ln(blk.norm1, q))
            ca = blk.cross_attn
            Bq, M, C = q.shape
            hh = ca.num_heads
            qq = F.linear(_ln(blk.norm2, q), ca.q.weight, ca.q.bias).reshape(Bq, M, hh, C // hh).transpose(1, 2)
            kv = F.linear(mem, ca.kv.weight, ca.kv.bias).reshape(Bq, -1, 2, hh, C // hh).permute(2, 0, 3, 1, 4)
            att = torch.matmul(qq * (C // hh) ** -0.5, kv[0].transpose(-2, -1)).softmax(-1)
            q = q + F.linear(torch.matmul(att, kv[1]).transpose(1, 2).reshape(Bq, M, C), ca.proj.weight, ca.proj.bias)
            q = q + _mlp(blk.mlp, _ln(blk.norm3, q))
        e = m.region_dec_blocks[-1]
        q = q + _attn(e.attn, _ln(e.norm1, q))
        xm = q.unsqueeze(2) + F.linear(mem, e.proj.weight, e.proj.bias).unsqueeze(1)  # [B, k, N+1, C]
        xm = _mlp(e.mlp, _ln(e.norm3, xm))
        rp = m.region_pred
        region_pred = F.linear(F.gelu(xm), rp[1].weight, rp[1].bias)[:, :, 1:, :]
        rl = F.binary_cross_entropy_with_logits(region_pred, target_region, reduction="none")
        if m.bg_loss_weight != 1.0:
            wl = target_region.detach().clone()
            wl[target_region == 0] = m.bg_loss_weight
            rl = rl * wl
        rl = rl.mean(dim=-1).mean(dim=1)
        region_loss = (rl * region_mask).sum() / region_mask.sum()
        out.update(region_pred=region_pred, region_loss=region_loss, region_mask=region_mask)
        loss = loss + m.region_loss_weight * region_loss
    out.update(loss=loss, mask=mask, ids_restore=ids_restore)
    return out


CLOSE = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant,kw", [
    ("rmae", {}),
    ("mae", {"norm_pix_loss": True}),
    ("rae", {}),
    ("rmae", {"bg_loss_weight": 0.3, "mae_loss_weight": 0.5, "region_loss_weight": 2.0, "norm_pix_loss": True}),
    ("rmae", {"region_mask_ratio": 0.5}),
    ("rmae", {"region_dec_depth": 2}),
    ("rmae", {"region_enc_depth": 2}),
    ("rae", {"region_enc_depth": 0}),
])
def test_matches_official_transcription(variant, kw):
    torch.manual_seed(1)
    m = tiny(variant, kernel_impl="reference", **kw)
    imgs, maps, _, noise = inputs()
    out = m(imgs, None if variant == "mae" else maps, noise=noise)
    ref = official_forward(m, imgs, maps, noise)
    torch.testing.assert_close(out.loss, ref["loss"], **CLOSE)
    torch.testing.assert_close(out.mask, ref["mask"])
    torch.testing.assert_close(out.ids_restore, ref["ids_restore"])
    if variant != "rae":
        torch.testing.assert_close(out.pred, ref["pred"], **CLOSE)
        torch.testing.assert_close(out.mae_loss, ref["mae_loss"], **CLOSE)
    else:
        assert out.pred is None and out.mae_loss is None
    if variant != "mae":
        torch.testing.assert_close(out.region_pred, ref["region_pred"], **CLOSE)
        torch.testing.assert_close(out.region_loss, ref["region_loss"], **CLOSE)
        torch.testing.assert_close(out.region_mask, ref["region_mask"])
    else:
        assert out.region_pred is None and out.region_loss is None and out.region_mask is None
    # gradients agree too
    g_out = torch.autograd.grad(out.loss, [p for p in m.parameters() if p.requires_grad])
    g_ref = torch.autograd.grad(ref["loss"], [p for p in m.parameters() if p.requires_grad])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_pixel_target_statistics_are_float32_for_low_precision_images():
    """Images given in bfloat16 (under autocast): the norm_pix target's per-patch mean and variance are computed in
    float32 from those values (they were bf16 arithmetic: a loss off by 3e-3), so the loss is the float32 images'."""
    torch.manual_seed(0)
    model = tiny(norm_pix_loss=True).eval()
    images = (0.3 * torch.randn(2, 3, model.img_size, model.img_size) + 0.1).bfloat16()  # low-contrast patches
    pred = torch.randn(2, model.num_patches, model.patch_size ** 2 * 3).bfloat16()
    mask = (torch.rand(2, model.num_patches) < 0.75).float()
    low, full = model.forward_loss(images, pred, mask), model.forward_loss(images.float(), pred, mask)
    assert low.dtype == torch.float32 and torch.equal(low, full)


def test_loss_recomputed_from_outputs():
    """Pixel loss from pred / patchified target / mask, BCE from region_pred / patchified maps / region_mask."""
    torch.manual_seed(2)
    m = tiny(norm_pix_loss=True, bg_loss_weight=0.5)
    imgs, maps, _, noise = inputs(B=3)
    # patches of very different contrast, down to nearly flat ones (variance ~1e-8 to 1e-6), where the 1e-6 in
    # the per-patch normalisation decides the target
    g = torch.Generator().manual_seed(5)
    contrast = torch.tensor([1.0, 1e-3, 1e-4])[torch.randint(0, 3, (3, 1, IMG // P, IMG // P), generator=g)]
    imgs = imgs * contrast.repeat_interleave(P, -1).repeat_interleave(P, -2)
    out = m(imgs, maps, noise=noise)
    t = _patchify(imgs, P)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True, unbiased=True) + 1e-6)
    per_patch = ((out.pred - t) ** 2).mean(-1)
    assert out.mask.sum(1).eq(N - int(N * 0.25)).all()
    mae = (per_patch * out.mask).sum() / out.mask.sum()
    tr = torch.stack([_patchify(maps[:, i:i + 1].float(), P) for i in range(K)], dim=1)  # [B, k, N, p*p]
    z = out.region_pred
    bce = torch.clamp(z, min=0) - z * tr + torch.log1p(torch.exp(-z.abs()))
    w = torch.where(tr > 0, torch.ones_like(tr), torch.full_like(tr, 0.5))
    per = (bce * w).mean(-1).mean(1)
    reg = (per * out.region_mask).sum() / out.region_mask.sum()
    torch.testing.assert_close(out.mae_loss, mae, **CLOSE)
    torch.testing.assert_close(out.region_loss, reg, **CLOSE)
    torch.testing.assert_close(out.loss, mae + reg, **CLOSE)


# ----------------------------------------------------------------------------- behaviour
def test_fixed_noise_reproducible():
    torch.manual_seed(3)
    m = tiny()
    imgs, maps, _, noise = inputs()
    a = m(imgs, maps, noise=noise)
    torch.manual_seed(123)
    b = m(imgs, maps, noise=noise.clone())
    assert torch.equal(a.loss, b.loss) and torch.equal(a.mask, b.mask)
    c = m(imgs, maps)  # fresh noise: a different mask (with overwhelming probability)
    assert not torch.equal(a.mask, c.mask)


def test_mae_equals_rmae_without_region_branch():
    torch.manual_seed(4)
    rm = tiny("rmae")
    mae = tiny("mae")
    missing, unexpected = mae.load_state_dict(rm.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("region_") for k in unexpected) and unexpected
    imgs, maps, _, noise = inputs()
    o1 = rm(imgs, maps, noise=noise)
    o2 = mae(imgs, noise=noise)
    torch.testing.assert_close(o1.mae_loss, o2.mae_loss, rtol=0, atol=0)
    torch.testing.assert_close(o2.loss, o2.mae_loss)
    assert o2.region_loss is None
    o1.mae_loss.backward()
    o2.loss.backward()
    params2 = dict(mae.named_parameters())
    for name, p in rm.named_parameters():
        if name in params2 and p.requires_grad:
            torch.testing.assert_close(p.grad, params2[name].grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_maps_and_labels_give_same_loss(impl):
    torch.manual_seed(5)
    m = tiny(kernel_impl=impl)
    imgs, maps, rl, noise = inputs()
    assert maps[0, -1].sum() == 0  # label_id -1 gives an all-zero map
    a = m(imgs, maps, noise=noise)
    b = m(imgs, rl, noise=noise)
    c = m(imgs, maps.bool(), noise=noise)
    d = m(imgs, maps.float(), noise=noise)
    for o in (b, c, d):
        torch.testing.assert_close(o.loss, a.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(o.region_pred, a.region_pred, rtol=1e-6, atol=1e-6)
    ga = torch.autograd.grad(a.loss, m.region_patch_embed.proj.weight)[0]
    gb = torch.autograd.grad(b.loss, m.region_patch_embed.proj.weight)[0]
    torch.testing.assert_close(ga, gb)
    # uint16 label maps (the data pipeline's storage dtype) work too
    rl16 = RegionLabels(rl.labels.to(torch.uint16), rl.scale_index, rl.label_id)
    torch.testing.assert_close(m(imgs, rl16, noise=noise).loss, a.loss, rtol=1e-6, atol=1e-7)


def test_region_mask_ratio_differs():
    torch.manual_seed(6)
    m = tiny(region_mask_ratio=0.5)
    imgs, maps, _, noise = inputs()
    out = m(imgs, maps, noise=noise, mask_ratio=0.75)
    assert out.mask.sum(1).eq(N - N // 4).all()
    assert out.region_mask.sum(1).eq(N - N // 2).all()
    # prefixes of one permutation: every pixel-visible patch is region-visible
    assert torch.all(out.region_mask <= out.mask)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_random_fg_needs_noise():
    m = tiny(region_sample_type="random_fg")
    imgs, maps, _, noise = inputs()
    with pytest.raises(ValueError, match="noise"):
        m(imgs, maps)
    assert torch.isfinite(m(imgs, maps, noise=noise).loss)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("use_labels", [False, True])
def test_triton_equals_reference(use_labels):
    torch.manual_seed(7)
    ref = tiny(kernel_impl="reference")
    tri = tiny(kernel_impl="triton")
    tri.load_state_dict(ref.state_dict())
    imgs, maps, rl, noise = inputs()
    regions = rl if use_labels else maps
    a = ref(imgs, regions, noise=noise)
    b = tri(imgs, regions, noise=noise)
    # the Triton path really runs (its autograd nodes differ from plain PyTorch's)
    ids = torch.argsort(noise, 1)[:, :4]
    assert type(tri.embed_regions(regions, ids).grad_fn) is not type(ref.embed_regions(regions, ids).grad_fn)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.region_pred, a.region_pred, rtol=1e-4, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    pb = dict(tri.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(pb[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- export
def test_export_matches_timm_vit_base_keys():
    with torch.device("meta"):
        model = rmae_base_patch16()
    exported = export_encoder(model)
    assert {k: list(v.shape) for k, v in exported.items()} == expected_encoder()  # timm vit_base_patch16_224
    with torch.device("meta"):
        vit = VisionTransformer(224, 16, 3, 768, 12, 12)
    vit.load_state_dict(exported, strict=True, assign=True)


def test_export_loads_into_plain_vit_and_matches_encoder():
    torch.manual_seed(8)
    m = tiny()
    compiled_like = {"_orig_mod." + k: v for k, v in m.state_dict().items()}
    ddp_like = {"module." + k: v for k, v in m.state_dict().items()}
    exported = export_encoder(m)
    for other in (export_encoder(compiled_like), export_encoder(ddp_like), export_encoder({"model": ddp_like})):
        assert other.keys() == exported.keys()
        assert all(torch.equal(other[k], exported[k]) for k in exported)
    assert not any(k.startswith(("decoder", "mask_token", "region")) for k in exported)
    vit = VisionTransformer(IMG, P, 3, 192, 2, 3)
    vit.load_state_dict(exported, strict=True)
    imgs = inputs()[0]
    ids_keep = torch.arange(N).expand(imgs.shape[0], -1)  # keep every patch, in order
    with torch.no_grad():
        torch.testing.assert_close(vit(imgs), m.forward_encoder(imgs, ids_keep), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    m = tiny()
    imgs, maps, rl, noise = inputs()
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\].*got \[2, 3, 64, 64\]"):
        m(torch.randn(2, 3, 64, 64), maps)
    with pytest.raises(ValueError, match="in_chans"):
        m(torch.randn(2, 1, IMG, IMG), maps)
    with pytest.raises(TypeError, match="float"):
        m(imgs.to(torch.uint8), maps)
    with pytest.raises(ValueError, match="num_region=8"):
        m(imgs, maps[:, :5])
    with pytest.raises(ValueError, match="num_region=8"):
        m(imgs, None)
    with pytest.raises(ValueError, match=r"region maps must be \[B, k, H, W\]"):
        m(imgs, maps[:, :, :16])
    with pytest.raises(TypeError, match="int32"):
        m(imgs, maps.to(torch.int32))
    with pytest.raises(ValueError, match="only 0 and 1"):
        m(imgs, maps.float() * 0.5)
    with pytest.raises(ValueError, match="uint8 region maps must contain only 0 and 1"):
        m(imgs, maps.to(torch.uint8) * 255)  # 0/255 masks would give an unbounded loss
    with pytest.raises(TypeError, match="images are torch.float64 but the model's weights are torch.float32"):
        m(imgs.double(), maps)
    for ratio in (0.0, 1.0, -0.5, 0.99):  # no removed patch (NaN loss) or no visible one (16 patches)
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            m(imgs, maps, mask_ratio=ratio)
    for ratio in (0.0, 1.0, 1.5, -0.5):
        with pytest.raises(ValueError, match="region_mask_ratio must be in"):
            tiny(region_mask_ratio=ratio)
    with pytest.raises(ValueError, match=r"noise must be \[B, N\] = \[2, 16\]"):
        m(imgs, maps, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="scale_index"):
        m(imgs, RegionLabels(rl.labels, rl.scale_index[:, :3], rl.label_id))
    with pytest.raises(TypeError, match="label_id must be int64"):
        m(imgs, RegionLabels(rl.labels, rl.scale_index, rl.label_id.int()))
    with pytest.raises(ValueError, match="num_region=0"):
        tiny("mae")(imgs, maps)
    with pytest.raises(ValueError, match="at least one loss"):
        RMAE(num_region=0, use_mae_loss=False)
    with pytest.raises(ValueError, match="kernel_impl"):
        tiny(kernel_impl="cuda")
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vit_base", "rmae")
    with pytest.raises(ValueError, match="unknown variant"):
        build_model("rmae_base_patch16", "mae3")


def test_factories_default_sizes():
    m = rmae_tiny_patch16(img_size=64)
    assert m.patch_embed.num_patches == 16 and m.num_region == 8 and m.region_cross_layer == 2
    with torch.device("meta"):
        b = build_model("base_patch16", "rae")
    assert not hasattr(b, "decoder_blocks") and len(b.region_cross_blocks) == 8


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not installed")
def test_bf16_autocast_triton_and_reference_agree():
    """GPU-readiness on CPU: bf16 autocast runs through both paths with fp32 losses and fp32 grads."""
    torch.manual_seed(9)
    ref = tiny(kernel_impl="reference")
    tri = tiny(kernel_impl="triton")
    tri.load_state_dict(ref.state_dict())
    imgs, maps, rl, noise = inputs()
    outs = []
    for m, regions in ((ref, maps), (tri, rl)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = m(imgs, regions, noise=noise)
        o.loss.backward()
        assert o.loss.dtype == torch.float32 and o.pred.dtype == torch.bfloat16
        assert m.region_patch_embed.proj.weight.grad.dtype == torch.float32
        outs.append(o)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(tri.region_patch_embed.proj.weight.grad, ref.region_patch_embed.proj.weight.grad,
                               rtol=2e-2, atol=1e-3)


def test_float64_model_runs_on_the_reference_kernels():
    """model.double() (e.g. for gradcheck): every kernel takes the reference path under impl='auto' (Triton
    under the interpreter for float32), with the float32 model's loss; impl='triton' says float64 is not its."""
    import copy

    torch.manual_seed(4)
    m32 = tiny()
    m64 = copy.deepcopy(m32).double()
    imgs, maps, rl, noise = inputs()
    for regions in (maps, rl):
        out32 = m32(imgs, regions, noise=noise)
        out64 = m64(imgs.double(), regions, noise=noise)
        out64.loss.backward()
        assert out64.loss.dtype == torch.float64 and m64.region_patch_embed.proj.weight.grad.dtype == torch.float64
        torch.testing.assert_close(out64.loss.float(), out32.loss, rtol=1e-5, atol=1e-6)
    # the pixel target keeps float64 (it was rounded to float32: losses off by up to 2e-8 with norm_pix_loss)
    m64.norm_pix_loss = True
    x, pred = imgs.double(), torch.randn(imgs.shape[0], m64.num_patches, m64.patch_size**2 * 3, dtype=torch.float64)
    removed = (torch.rand(imgs.shape[0], m64.num_patches) < 0.75).double()
    target = m64.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (((pred - target) ** 2).mean(-1) * removed).sum() / removed.sum()
    torch.testing.assert_close(m64.forward_loss(x, pred, removed), expected, rtol=1e-15, atol=0)
    if kernels.HAS_TRITON:
        forced = copy.deepcopy(m64)
        forced.kernel_impl = "triton"
        with pytest.raises(RuntimeError, match="float64 runs on the reference"):
            forced(imgs.double(), rl, noise=noise)


def test_save_encoder_safetensors(tmp_path):
    from safetensors.torch import load_file

    from rmae.models import save_encoder

    m = tiny()
    save_encoder(m, tmp_path / "enc.safetensors")
    loaded = load_file(str(tmp_path / "enc.safetensors"))
    exported = export_encoder(m)
    assert loaded.keys() == exported.keys() and all(torch.equal(loaded[k], exported[k]) for k in exported)


def test_load_checkpoint_official_layout(tmp_path):
    from rmae.models import load_checkpoint

    torch.manual_seed(10)
    src = tiny()
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "c.pth")
    dst = tiny()
    res = load_checkpoint(dst, tmp_path / "c.pth")
    assert not res.missing_keys and not res.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    mae = tiny("mae")  # an R-MAE state into the MAE variant: only region keys are extra
    res = load_checkpoint(mae, src.state_dict(), strict=False)
    assert not res.missing_keys and all(k.startswith("region_") for k in res.unexpected_keys)


def test_load_checkpoint_into_a_compiled_model(tmp_path):
    """A torch.compile wrapper takes the clean keys too (it expects them under ``_orig_mod.``)."""
    from rmae.models import load_checkpoint

    torch.manual_seed(11)
    src, dst = tiny(), tiny()
    compiled = torch.compile(dst)  # (lazy: nothing is compiled until it runs)
    res = load_checkpoint(compiled, {"model": src.state_dict()})
    assert not res.missing_keys and not res.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_wrapper_prefixes_are_dropped_at_any_depth(tmp_path):
    """A block compiled on its own keeps ``_orig_mod.`` inside its keys: the export and the loader drop it."""
    from rmae.models import export_encoder, load_checkpoint
    from rmae.models.export import clean_key

    assert clean_key("module._orig_mod.blocks.0._orig_mod.norm1.weight") == "blocks.0.norm1.weight"
    assert clean_key("_orig_mod.module._orig_mod.blocks.0._orig_mod._orig_mod.module.norm1.weight") \
        == "blocks.0.norm1.weight"
    src = tiny()
    state = {k.replace("blocks.0.", "blocks.0._orig_mod.").replace("cls_token", "module.cls_token"): v
             for k, v in src.state_dict().items()}
    assert not load_checkpoint(tiny(), state).missing_keys
    assert export_encoder(state).keys() == export_encoder(src).keys()


def test_exported_encoder_is_readable_as_the_umask_allows(tmp_path):
    """safetensors writes its file 0600; an encoder in a shared run folder must be readable by the group/others
    that the umask lets read (0644 under 022, 0640 under 027)."""
    from rmae.models import save_encoder

    old = os.umask(0o027)
    try:
        save_encoder(tiny(), str(tmp_path / "e.safetensors"))
        save_encoder(tiny(), str(tmp_path / "e.pth"))
    finally:
        os.umask(old)
    assert oct((tmp_path / "e.safetensors").stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "e.pth").stat().st_mode & 0o777) == oct(0o640)


def test_load_checkpoint_takes_a_bytes_path(tmp_path):
    from rmae.models import load_checkpoint

    src = tiny()
    torch.save({"model": src.state_dict()}, tmp_path / "c.pth")
    res = load_checkpoint(tiny(), bytes(tmp_path / "c.pth"))
    assert not res.missing_keys and not res.unexpected_keys


def test_exported_safetensors_say_what_encoder_they_hold(tmp_path, capsys):
    """The header names the timm model and sizes (read from the shapes), so a file alone says how to load it."""
    from safetensors import safe_open

    from rmae.export import main
    from rmae.config import load_config, to_yaml
    from rmae.models.export import encoder_metadata, save_encoder, timm_call

    model = build_model("rmae_tiny_patch16", "mae", img_size=112)  # the demo's encoder
    save_encoder(model, str(tmp_path / "enc.safetensors"))
    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta == {"format": "pt", "producer": "rmae", "embed_dim": "192", "depth": "12", "patch_size": "16",
                    "in_chans": "3", "img_size": "112", "mlp_ratio": "4", "timm_model": "vit_tiny_patch16_224",
                    "num_heads": "3", "num_heads_from": "the model"}
    assert timm_call(meta) == 'timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=112)'
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    assert main([str(tmp_path / "ckpt.pt"), str(tmp_path / "again.safetensors")]) == 0
    out = capsys.readouterr().out
    assert ('model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=112); model.load_state_dict('
            f"safetensors.torch.load_file({str(tmp_path / 'again.safetensors')!r}))") in out, out
    # the heads are the model's (a checkpoint's config says them): other heads or MLP width, no timm name
    for kwargs, heads in (({"num_heads": 6}, "6"), ({"mlp_ratio": 2.0}, "3")):
        other = build_model("rmae_tiny_patch16", "mae", img_size=112, **kwargs)
        save_encoder(other, str(tmp_path / "other.safetensors"))
        with safe_open(str(tmp_path / "other.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["num_heads"] == heads and "timm_model" not in meta and timm_call(meta) == "", meta
    # a training checkpoint's config gives the export command the model's heads
    torch.save({"model": model.state_dict(), "config": to_yaml(load_config(None, [
        "model_config.rmae.mae_vit.arch=rmae_tiny_patch16", "model_config.rmae.mae_vit.params.img_size=112"]))},
        tmp_path / "o.pt")
    assert main([str(tmp_path / "o.pt"), str(tmp_path / "o.safetensors")]) == 0
    assert ", 3 heads)" in capsys.readouterr().out
    # an exported encoder exported again keeps the head count its header records as the model's (6: not the standard)
    save_encoder(build_model("rmae_tiny_patch16", "mae", img_size=112, num_heads=6), str(tmp_path / "six.safetensors"))
    assert main([str(tmp_path / "six.safetensors"), str(tmp_path / "six_again.safetensors")]) == 0
    assert ", 6 heads)" in capsys.readouterr().out
    with safe_open(str(tmp_path / "six_again.safetensors"), "pt") as f:
        assert (f.metadata()["num_heads"], f.metadata()["num_heads_from"]) == ("6", "the model")
    # a non-square grid of positions: no img_size, no timm call
    state = export_encoder(model)
    state["pos_embed"] = torch.zeros(1, 1 + 7 * 8, 192)
    assert "img_size" not in encoder_metadata(state) and timm_call(encoder_metadata(state)) == ""
    # an official file carries no config: the standard heads of the size, said to be assumed
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    assert main([str(tmp_path / "official.pth"), str(tmp_path / "off.safetensors")]) == 0
    assert "3 heads (assumed: the standard for this size)" in capsys.readouterr().out
    # every official size maps to its timm name; 224 px needs no img_size
    for arch, (name, heads) in {"rmae_base_patch16": ("vit_base_patch16_224", 12),
                                "rmae_huge_patch14": ("vit_huge_patch14_224", 16)}.items():
        with torch.device("meta"):
            state = export_encoder(build_model(arch, "mae"))
        meta = encoder_metadata(state)
        assert (meta["timm_model"], meta["num_heads"], meta["img_size"]) == (name, str(heads), "224")
        assert timm_call(meta) == f'timm.create_model("{name}", num_classes=0)'


def test_the_export_commands_first_name_runs_without_a_warning():
    """``python -m rmae.models.export`` (the command's first name) runs a module its package has imported: runpy's
    warning about it is not shown."""
    r = subprocess.run([sys.executable, "-m", "rmae.models.export", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout and "RuntimeWarning" not in r.stderr, r.stderr


def test_export_command_writes_the_encoder_of_a_checkpoint(tmp_path, capsys):
    """An interrupted run leaves checkpoints, no encoder: ``python -m rmae.export`` makes it from one."""
    from safetensors.torch import load_file

    from rmae.models import export_encoder
    from rmae.export import main

    src = tiny()
    torch.save({"model": src.state_dict(), "step": 7, "config": "model: rmae\n"}, tmp_path / "ckpt.pt")
    assert main([str(tmp_path / "ckpt.pt"), str(tmp_path / "enc.safetensors")]) == 0
    got, expected = load_file(tmp_path / "enc.safetensors"), export_encoder(src)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    out = capsys.readouterr().out
    assert "parameters" in out and f"{IMG} px" in out and "timm.create_model" not in out  # depth 2: no timm name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "enc.safetensors"]  # no temporary file left
    # a file that pickles other objects needs --trust; a file without an encoder and a missing file are errors
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "official.pth")
    assert main([str(tmp_path / "official.pth"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err  # (the object named; PyTorch's terminal escape codes left out)
    assert "add --trust" in err and "Unsupported global" in err and "Namespace" in err and "\x1b" not in err, err
    assert main([str(tmp_path / "official.pth"), str(tmp_path / "o.pth"), "--trust"]) == 0
    assert torch.load(tmp_path / "o.pth").keys() == expected.keys()
    torch.save({"model": {"decoder_pred.weight": torch.zeros(2)}}, tmp_path / "dec.pt")
    assert main([str(tmp_path / "dec.pt"), str(tmp_path / "x.safetensors")]) == 2
    assert "encoder keys" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert main([str(tmp_path / "none.pt"), str(tmp_path / "x.safetensors")]) == 2
    assert "No such file" in capsys.readouterr().err
    # the arguments swapped, or the output the input itself: refused, the checkpoint kept as it was
    run_ckpt = tmp_path / "ckpt_00000007.pt"
    run_ckpt.write_bytes((tmp_path / "ckpt.pt").read_bytes())
    before = run_ckpt.read_bytes()
    assert main([str(tmp_path / "enc.safetensors"), str(run_ckpt)]) == 2
    assert "ckpt_00000007.pt is named as a training checkpoint" in capsys.readouterr().err
    assert main([str(run_ckpt), str(tmp_path / "ckpt_00000009.pt")]) == 2  # a new file of that name: resuming reads it
    assert "ckpt_00000009.pt is named as a training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "ckpt_00000009.pt").exists()
    assert main([str(run_ckpt), str(run_ckpt)]) == 2
    assert "ckpt_00000007.pt is the checkpoint it exports" in capsys.readouterr().err
    assert run_ckpt.read_bytes() == before
    run_ckpt.unlink()
    # an output folder that does not exist, an object that is no state, a file that is no checkpoint: errors
    assert main([str(tmp_path / "ckpt.pt"), str(tmp_path / "no" / "x.safetensors")]) == 2
    assert main([str(tmp_path / "ckpt.pt"), str(tmp_path / "no" / "x.pth")]) == 2
    assert capsys.readouterr().err.count("/no) does not exist") == 2
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    assert main([str(tmp_path / "list.pt"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "error: cannot export" in err and "not a model state" in err and "Traceback" not in err
    whole = (tmp_path / "ckpt.pt").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 30):  # a write that was killed (before or inside the zip's directory)
        (tmp_path / "cut.pt").write_bytes(whole[:cut])
        assert main([str(tmp_path / "cut.pt"), str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
        assert "cut.pt cannot be read as a torch checkpoint (truncated or damaged" in err and "Traceback" not in err, err
    # folders: OUT is refused; a run folder as CHECKPOINT gives its newest checkpoint
    assert main([str(tmp_path / "ckpt.pt"), str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder: give the encoder file's name" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main([str(tmp_path / "run"), str(tmp_path / "r.safetensors")]) == 2
    assert "is a folder without checkpoints" in capsys.readouterr().err
    for step in (3, 7):
        (tmp_path / "run" / "checkpoints" / f"ckpt_{step:08d}.pt").write_bytes(whole)
    assert main([str(tmp_path / "run"), str(tmp_path / "r.safetensors")]) == 0
    assert "exporting " + str(tmp_path / "run" / "checkpoints" / "ckpt_00000007.pt") in capsys.readouterr().out
    assert load_file(tmp_path / "r.safetensors").keys() == expected.keys()
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a checkpoint")
    for extra in ([], ["--trust"]):
        assert main([str(tmp_path / "photo.jpg"), str(tmp_path / "x.safetensors"), *extra]) == 2
        err = capsys.readouterr().err
        assert "is not a torch checkpoint (neither a zip archive nor a pickle" in err and "--trust" not in err, err
        assert "weights_only" not in err, err
    # the file format before torch 1.6 (no zip archive) cannot be memory-mapped: read without
    torch.save({"model": src.state_dict()}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert main([str(tmp_path / "legacy.pth"), str(tmp_path / "l.safetensors")]) == 0
    assert load_file(tmp_path / "l.safetensors").keys() == expected.keys()
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "no").exists()


# ----------------------------------------------------------------------------- pictures
@pytest.mark.parametrize("variant", ["rmae", "rae", "mae"])
def test_pictures_show_every_region_in_labelled_columns(variant):
    """One labelled column per tile: input, masked, reconstruction (not for RAE), target/prediction of every
    one of the k regions (none for MAE); the input tile is the de-normalised image, each target tile its map."""
    from rmae.visualize import PAD, render

    torch.manual_seed(0)
    k = 0 if variant == "mae" else 5
    model = tiny(variant, num_region=k).eval()
    images = torch.randn(2, 3, IMG, IMG)
    maps = (torch.rand(2, k, IMG, IMG) > 0.5).to(torch.uint8) if k else None
    with torch.no_grad():
        out = model(images, maps)
    picture = render(model, images, maps, out, title="step 7")
    columns = (2 if variant == "rae" else 3) + 2 * k
    tile = IMG + 2 * PAD
    head = picture.shape[0] - 2 * tile
    assert picture.dtype == np.uint8 and picture.shape[1:] == (columns * tile, 3) and 20 <= head <= 80
    for c in range(columns):  # a label (dark pixels) over every column, in the header row above the tiles
        assert (picture[head - 14:head, c * tile:(c + 1) * tile] < 128).any(), c
    assert (picture[:12, :tile] < 128).any()  # the title line
    from rmae.visualize import MEAN, STD

    first = picture[head + PAD:head + PAD + IMG, PAD:PAD + IMG].astype(int)
    expected = ((images[0] * STD + MEAN).clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(int)
    assert np.abs(first - expected).max() <= 1
    from rmae.visualize import GIVEN_OFF, GIVEN_ON

    removed = None if not k else \
        out.region_mask[1].view(IMG // P, IMG // P).repeat_interleave(P, 0).repeat_interleave(P, 1).bool()
    for j in range(k):  # the target tile of region j of image 1, then its prediction tile
        left = ((2 if variant == "rae" else 3) + 2 * j) * tile + PAD
        shown = picture[head + tile + PAD:head + tile + PAD + IMG, left:left + IMG, 0]
        np.testing.assert_array_equal(shown, maps[1, j].numpy() * 255)
        pred = picture[head + tile + PAD:head + tile + PAD + IMG, left + tile:left + tile + IMG].astype(int)
        grey = pred[removed.numpy()]  # the masked patches: the probability in grey
        assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
        given = pred[~removed.numpy()]  # the visible ones: the given target in blue
        expected = np.where(maps[1, j].numpy()[~removed.numpy()][:, None] > 0, GIVEN_ON, GIVEN_OFF)
        assert np.abs(given - expected).max() <= 1


def test_layer_norm_computes_in_fp32_with_low_precision_weights():
    """The model's LayerNorm is nn.LayerNorm (same parameters, eps 1e-6, bit-equal in fp32) computed in fp32
    whatever the dtypes: bf16 weights (FSDP2's copies) with an fp32 input under CPU autocast, which
    nn.LayerNorm refuses there, give the fp32 result of the upcast weights."""
    from rmae.models.vit import LayerNorm

    g = torch.Generator().manual_seed(3)
    ours, plain = LayerNorm(16), torch.nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        for p in (*ours.parameters(), *plain.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert ours.state_dict().keys() == plain.state_dict().keys() and ours.eps == 1e-6
    x = torch.randn(4, 5, 16, generator=g)
    assert torch.equal(ours(x), plain(x))
    low = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low(x)
        out_bf16_input = low(x.bfloat16())
        with pytest.raises(RuntimeError, match="mixed dtype"):
            copy.deepcopy(plain).to(torch.bfloat16)(x)
    expected = torch.nn.functional.layer_norm(x, (16,), low.weight.float(), low.bias.float(), 1e-6)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert out_bf16_input.dtype == torch.float32
    # without autocast (a .bfloat16() model): computed in fp32, returned in the input's dtype
    bf16_out = low(x.bfloat16())
    assert bf16_out.dtype == torch.bfloat16
    assert torch.equal(bf16_out, torch.nn.functional.layer_norm(
        x.bfloat16().float(), (16,), low.weight.float(), low.bias.float(), 1e-6).bfloat16())
