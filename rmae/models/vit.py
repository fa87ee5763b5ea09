"""ViT building blocks with timm / MAE parameter names.

Block, Attention, Mlp and PatchEmbed follow facebookresearch/mae (and R-MAE's ``pretrain/module/layers.py``):
pre-norm, qkv bias, GELU, LayerNorm eps 1e-6, no dropout / drop-path / layer-scale. Attention runs through
``F.scaled_dot_product_attention`` (scale head_dim**-0.5, its default).

``VisionTransformer`` is the plain encoder (no masking) whose ``state_dict`` keys are exactly timm's
``vit_*_patch16_224`` keys with ``num_classes=0``; ``rmae.models.export.export_encoder`` produces dicts for it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (eps 1e-6, the same parameters) computed in float32 (float64 for a float64 input) whatever
    the dtypes of the input and of the weights, as CUDA autocast computes it; under autocast the result stays in
    that dtype (as CUDA autocast's), otherwise it is returned in the input's dtype (a ``.bfloat16()`` model). Under
    FSDP2's low-precision policy the blocks' weights arrive in bfloat16 while the residual stream stays float32,
    which CPU autocast's kernel refuses."""

    def __init__(self, normalized_shape, eps: float = 1e-6, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        autocasting = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            out = F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
        return out if autocasting else out.to(x.dtype)


# --------------------------------------------------------------------------
# 2-D sin-cos position tables (MAE's util/pos_embed.py as copied in R-MAE's utils/functional.py: bit-equal)
# --------------------------------------------------------------------------
def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: positions, any shape -> [M, embed_dim] (sin half, then cos half)."""
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float32)  # float32 as R-MAE's copy (MAE's uses float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # [D/2]
    pos = pos.reshape(-1)  # [M]
    out = np.einsum("m,d->md", pos, omega)  # [M, D/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # [H*W, D/2]
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # [H*W, D/2]
    return np.concatenate([emb_h, emb_w], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """[grid_size*grid_size (+1), embed_dim]; with ``cls_token`` a zero row is prepended."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def fill_sincos_(param: torch.Tensor, grid_size: int, cls_token: bool = True) -> None:
    """Write the fixed table into a [1, N(+1), D] parameter/buffer in place."""
    table = get_2d_sincos_pos_embed(param.shape[-1], grid_size, cls_token=cls_token)
    with torch.no_grad():
        param.copy_(torch.from_numpy(table).float().unsqueeze(0))


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv2d(in_chans -> embed_dim, p, stride p); [B, C, H, W] -> [B, N, D] (row-major patches)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries [B, M, C] attend to memory [B, L, Ck] (R-MAE's ``q``/``kv``/``proj`` names)."""

    def __init__(self, qdim: int, kvdim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if qdim % num_heads != 0:
            raise ValueError(f"dim {qdim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(qdim, qdim, bias=qkv_bias)
        self.kv = nn.Linear(kvdim, qdim * 2, bias=qkv_bias)
        self.proj = nn.Linear(qdim, qdim)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, M, C = query.shape
        L = memory.shape[1]
        h = self.num_heads
        q = self.q(query).reshape(B, M, h, C // h).transpose(1, 2)
        k, v = self.kv(memory).reshape(B, L, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, M, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, m) with the block's output = h + m, so a consumer can fuse the last residual add."""
        h = x + self.attn(self.norm1(x))
        return h, self.mlp(self.norm2(h))


class VisionTransformer(nn.Module):
    """Plain ViT encoder (cls token, fixed sin-cos positions, blocks, final norm) with timm's key names.

    ``forward(images)`` -> [B, N+1, D], the normed token sequence (cls first). Loads
    ``export_encoder(model)`` with ``strict=True``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)
        fill_sincos_(self.pos_embed, self.patch_embed.grid_size[0], cls_token=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
