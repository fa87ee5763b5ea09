"""R-MAE: masked pixel reconstruction (MAE) + masked region reconstruction with region queries.

Reads top to bottom like facebookresearch/mae's ``models_mae.py``; architecture, parameter names and init follow
facebookresearch/r-mae (``RegionQueryRMAE``). Variants:

* MAE      ``num_region=0``                 (no region parameters)
* RAE      ``use_mae_loss=False``            (no pixel decoder parameters)
* R-MAE    both on (the default, k = 8)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from rmae import kernels
from .regions import RegionLabels, check_region_labels, check_region_maps
from .vit import Attention, Block, CrossAttention, LayerNorm, Mlp, PatchEmbed, fill_sincos_

KERNEL_IMPLS = ("auto", "triton", "reference")


def visible_count(num_patches: int, ratio: float, name: str) -> int:
    """Patches left visible by masking ``ratio`` of ``num_patches`` (the official ``int(N * (1 - ratio))``).

    The losses are means over the removed patches and the encoders need a visible one, so at least one of
    each is required: a clear error here instead of a NaN loss or a failure deep in a kernel."""
    keep = int(num_patches * (1 - ratio)) if 0.0 < ratio < 1.0 else -1
    if not 1 <= keep < num_patches:
        raise ValueError(f"{name} must be in (0, 1) and leave at least one of the {num_patches} patches visible "
                         f"and one removed, got {ratio}")
    return keep


@dataclass
class RMAEOutput:
    loss: torch.Tensor                      # mae_loss_weight * mae_loss + region_loss_weight * region_loss
    mae_loss: Optional[torch.Tensor]        # None when use_mae_loss=False
    region_loss: Optional[torch.Tensor]     # None when num_region=0
    pred: Optional[torch.Tensor]            # [B, N, p*p*C] pixel predictions
    region_pred: Optional[torch.Tensor]     # [B, k, N, p*p] region logits
    mask: torch.Tensor                      # [B, N], 1 = removed (pixel branch)
    region_mask: Optional[torch.Tensor]     # [B, N], 1 = removed (region branch)
    ids_restore: torch.Tensor               # [B, N]


# --------------------------------------------------------------------------
# Region decoder blocks (official names: DecoderBlock, DecoderBlockWithExpansion)
# --------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    """Query self-attention, cross-attention to memory, MLP (all residual). Used when region_dec_depth > 1."""

    def __init__(self, dim: int, enc_dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, enc_dim, num_heads)
        self.norm3 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm1(q))
        q = q + self.cross_attn(self.norm2(q), memory)
        return q + self.mlp(self.norm3(q))


class DecoderBlockWithExpansion(nn.Module):
    """Self-attention over the k queries, then expansion by broadcast addition with the projected memory:
    ``x[b, i, n] = q[b, i] + proj(memory)[b, n]``, then ``mlp(norm3(x))`` (hidden = dim) with NO residual."""

    def __init__(self, dim: int, enc_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.proj = nn.Linear(enc_dim, dim)
        self.norm3 = LayerNorm(dim)
        self.mlp = Mlp(dim, dim)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm1(q))                       # [B, k, C]
        x = q.unsqueeze(2) + self.proj(memory).unsqueeze(1)    # [B, k, M, C]
        return self.mlp(self.norm3(x))



# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------
class RMAE(nn.Module):
    """R-MAE / MAE / RAE pre-training model (the official keyword names; defaults = official ViT-B/16 R-MAE).

    ``forward(images, regions=None, noise=None, mask_ratio=0.75) -> RMAEOutput``

    * ``images``: float [B, in_chans, img_size, img_size] (normalized).
    * ``regions``: binary maps [B, k, H, W] (uint8 / bool; 0/1 float accepted) or ``RegionLabels``; required iff
      ``num_region > 0``; moved to the images' device if needed.
    * ``noise``: optional [B, N]; ``argsort(noise)`` is the per-image permutation (small = kept), exactly the
      original's ``torch.rand(B, N)``. Pixel and region visible sets are prefixes of it.
    * ``kernel_impl``: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else PyTorch), "triton", or
      "reference" (plain PyTorch everywhere).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        num_region: int = 8,
        use_mae_loss: bool = True,
        mae_loss_weight: float = 1.0,
        bg_loss_weight: float = 1.0,
        region_loss_weight: float = 1.0,
        region_mask_ratio: float = 0.75,
        region_enc_dim: int = 128,
        region_enc_depth: int = 1,
        region_enc_num_heads: int = 8,
        region_dec_dim: int = 128,
        region_dec_depth: int = 1,
        region_dec_num_heads: int = 8,
        region_cross_layer: int = 8,
        region_sample_type: str = "random",
        kernel_impl: str = "auto",
    ):
        super().__init__()
        if not use_mae_loss and num_region == 0:
            raise ValueError("at least one loss is needed: got use_mae_loss=False and num_region=0")
        if kernel_impl not in KERNEL_IMPLS:
            raise ValueError(f"kernel_impl must be one of {KERNEL_IMPLS}, got {kernel_impl!r}")
        if region_sample_type not in ("random", "random_fg"):
            raise ValueError(f"region_sample_type must be 'random' or 'random_fg', got {region_sample_type!r}")
        if num_region > 0 and region_dec_depth < 1:
            raise ValueError(f"region_dec_depth must be >= 1, got {region_dec_depth}")

        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.num_region = num_region
        self.use_mae_loss = use_mae_loss
        self.mae_loss_weight = mae_loss_weight
        self.bg_loss_weight = bg_loss_weight
        self.region_loss_weight = region_loss_weight
        self.region_mask_ratio = region_mask_ratio
        self.region_enc_dim = region_enc_dim
        self.region_cross_layer = region_cross_layer
        self.region_sample_type = region_sample_type
        self.kernel_impl = kernel_impl

        # ---------------------------------------------------------------- MAE encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.num_patches = num_patches
        if num_region > 0:
            visible_count(num_patches, region_mask_ratio, "region_mask_ratio")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)

        # ---------------------------------------------------------------- MAE pixel decoder
        if use_mae_loss:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                                  requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
            self.decoder_norm = LayerNorm(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        # ---------------------------------------------------------------- region branch
        if num_region > 0:
            # neck: latent -> memory [B, N+1, region_dec_dim]
            self.region_cross_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, region_dec_dim),
                                                       requires_grad=False)
            self.region_cross_embed = nn.Linear(embed_dim, region_dec_dim)
            self.region_dec_norm = LayerNorm(region_dec_dim)
            self.region_cross_mask_token = nn.Parameter(torch.zeros(1, 1, region_dec_dim))
            self.region_cross_blocks = nn.ModuleList(
                [Block(region_dec_dim, region_dec_num_heads, mlp_ratio) for _ in range(region_cross_layer)])
            # region tokens + region encoder (shared over the k regions)
            self.region_patch_embed = PatchEmbed(img_size, patch_size, 1, region_enc_dim)
            # Stored [1, N+1, D] (zero cls row) as in the official checkpoints; only rows 1: are used.
            self.region_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, region_enc_dim),
                                                 requires_grad=False)
            self.region_enc_blocks = nn.ModuleList(
                [Block(region_enc_dim, region_enc_num_heads, mlp_ratio) for _ in range(region_enc_depth)])
            # region decoder
            self.region_proj = nn.Sequential(LayerNorm(region_enc_dim), nn.Linear(region_enc_dim, region_dec_dim))
            self.region_dec_blocks = nn.ModuleList(
                [DecoderBlock(region_dec_dim, region_dec_dim, region_dec_num_heads, mlp_ratio)
                 for _ in range(region_dec_depth - 1)]
                + [DecoderBlockWithExpansion(region_dec_dim, region_dec_dim, region_dec_num_heads)])
            self.region_pred = nn.Sequential(nn.GELU(), nn.Linear(region_dec_dim, patch_size**2))

        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        # The official initialisation (MAE's initialize_weights, then the region part, then a second pass over
        # Linear/LayerNorm): the same distributions. Not the same random draws for a seed: the official code
        # runs MAE's pass once more, before the region modules exist.
        grid = self.patch_embed.grid_size[0]
        fill_sincos_(self.pos_embed, grid, cls_token=True)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like nn.Linear
        nn.init.normal_(self.cls_token, std=0.02)
        if self.use_mae_loss:
            fill_sincos_(self.decoder_pos_embed, grid, cls_token=True)
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)
        if self.num_region > 0:
            fill_sincos_(self.region_pos_embed, grid, cls_token=True)
            w = self.region_patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
            nn.init.normal_(self.region_cross_mask_token, std=0.02)
            fill_sincos_(self.region_cross_pos_embed, grid, cls_token=True)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ helpers
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C], patches row-major, pixels (p, q, c)."""
        p = self.patch_size
        B, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(B, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(B, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        C = x.shape[2] // (p * p)
        x = x.reshape(x.shape[0], h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], C, h * p, w * p)

    @staticmethod
    def random_masking(noise: torch.Tensor):
        """One permutation per image from ``noise`` (argsort, small = keep) -> (ids_shuffle, ids_restore).

        Pixel and region visible sets are prefixes of the same ids_shuffle (see ``_prefix_mask``).
        """
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        return ids_shuffle, ids_restore

    @staticmethod
    def _prefix_mask(ids_shuffle: torch.Tensor, ids_restore: torch.Tensor, len_keep: int):
        B, N = ids_shuffle.shape
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(B, N, device=ids_shuffle.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # 0 keep, 1 remove
        return ids_keep, mask

    # ------------------------------------------------------------------ encoder
    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, _ = kernels.gather_visible(x, ids_keep, impl=self.kernel_impl)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # [B, 1+L, D]

    # ------------------------------------------------------------------ pixel decoder
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        x = kernels.unshuffle_fill(x, self.mask_token, ids_restore, self.decoder_pos_embed,
                                   impl=self.kernel_impl)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # [B, N, p*p*C]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)  # (bf16 images under autocast: the per-patch statistics in fp32 at least)
        target = target.to(torch.promote_types(target.dtype, torch.float32))
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # [B, N]
        return (loss * mask).sum() / mask.sum()

    # ------------------------------------------------------------------ region branch
    def forward_region_neck(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.region_cross_embed(latent)
        x = kernels.unshuffle_fill(x, self.region_cross_mask_token, ids_restore, self.region_cross_pos_embed,
                                   impl=self.kernel_impl)
        for blk in self.region_cross_blocks:
            x = blk(x)
        return self.region_dec_norm(x)  # memory [B, N+1, Cd]

    def embed_regions(self, regions: Union[torch.Tensor, RegionLabels], ids_keep: torch.Tensor) -> torch.Tensor:
        w, b = self.region_patch_embed.proj.weight, self.region_patch_embed.proj.bias
        pos = self.region_pos_embed[:, 1:, :]
        if isinstance(regions, RegionLabels):
            return kernels.region_tokens_from_labels(regions.labels, regions.scale_index, regions.label_id, ids_keep,
                                                     w, b, pos, self.patch_size, impl=self.kernel_impl)
        return kernels.region_tokens(regions, ids_keep, w, b, pos, self.patch_size, impl=self.kernel_impl)

    def forward_region_encoder(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, k, L, De] visible region tokens -> [B, k, De] region queries (mean over all L tokens)."""
        B, k, L, D = tokens.shape
        x = tokens.reshape(B * k, L, D)
        if len(self.region_enc_blocks) == 0:
            return kernels.region_query_pool(tokens, impl=self.kernel_impl)
        for blk in self.region_enc_blocks[:-1]:
            x = blk(x)
        h, m = self.region_enc_blocks[-1].forward_split(x)  # block output = h + m, added inside the pool
        return kernels.region_query_pool(m.view(B, k, L, D), residual=h.view(B, k, L, D), impl=self.kernel_impl)

    def forward_region_decoder(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.region_proj(queries)
        for blk in self.region_dec_blocks[:-1]:
            q = blk(q, memory)
        # The expansion block is per memory token after its self-attention over queries, so dropping the cls
        # memory row before it equals the official "expand over N+1, then drop cls" and saves the work.
        x = self.region_dec_blocks[-1](q, memory[:, 1:, :])
        return self.region_pred(x)  # [B, k, N, p*p] logits

    def forward_region_loss(self, region_pred: torch.Tensor, regions: Union[torch.Tensor, RegionLabels],
                            region_mask: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits against patchify(maps) (bg weight on 0-pixels), mean over pixels, then regions,
        then removed patches; the targets are read from the uint8 maps / label maps inside the kernel."""
        if isinstance(regions, RegionLabels):
            return kernels.region_bce_loss_from_labels(region_pred, regions.labels, regions.scale_index,
                                                       regions.label_id, region_mask, self.patch_size,
                                                       self.bg_loss_weight, impl=self.kernel_impl)
        return kernels.region_bce_loss(region_pred, regions, region_mask, self.patch_size, self.bg_loss_weight,
                                       impl=self.kernel_impl)

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, imgs, regions, noise):
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"images must be a tensor [B, {self.in_chans}, H, W], got {type(imgs).__name__}")
        exp = (self.in_chans, self.img_size, self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != exp:
            raise ValueError(f"images must be [B, {exp[0]}, {exp[1]}, {exp[2]}] (in_chans={self.in_chans}, "
                             f"img_size={self.img_size}), got {list(imgs.shape)}")
        if not imgs.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalized), got {imgs.dtype}")
        weight = self.patch_embed.proj.weight
        if imgs.dtype != weight.dtype and not torch.is_autocast_enabled(imgs.device.type):
            raise TypeError(f"images are {imgs.dtype} but the model's weights are {weight.dtype}: convert them "
                            f"(images.to({weight.dtype})) or run under torch.autocast")
        B = imgs.shape[0]
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (B, self.num_patches):
                got = list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(f"noise must be [B, N] = [{B}, {self.num_patches}], got {got}")
        if self.num_region == 0:
            if regions is not None:
                k = regions.num_regions if isinstance(regions, RegionLabels) else (
                    regions.shape[1] if isinstance(regions, torch.Tensor) and regions.dim() == 4 else None)
                if k != 0:
                    raise ValueError(f"this model has num_region=0 (MAE) but got regions ({k} per image)")
            return None
        if regions is None:
            raise ValueError(f"this model has num_region={self.num_region}: pass regions as binary maps "
                             f"[B, {self.num_region}, {self.img_size}, {self.img_size}] or RegionLabels")
        if isinstance(regions, RegionLabels):
            check_region_labels(regions, B, self.num_region, self.img_size)
            return regions
        return check_region_maps(regions, B, self.num_region, self.img_size)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, regions: Union[torch.Tensor, RegionLabels, None] = None,
                noise: Optional[torch.Tensor] = None, mask_ratio: float = 0.75) -> RMAEOutput:
        regions = self._check_inputs(images, regions, noise)
        B, N = images.shape[0], self.num_patches
        len_keep = visible_count(N, mask_ratio, "mask_ratio")
        if noise is None:
            if self.region_sample_type == "random_fg":
                raise ValueError("region_sample_type='random_fg' needs the caller's permutation: pass noise")
            noise = torch.rand(B, N, device=images.device)
        dev = images.device
        noise = noise.to(dev, non_blocking=True)
        if isinstance(regions, RegionLabels):  # compact uint8/uint16 inputs move cheaply; convert on device
            if regions.labels.device != dev:
                regions = regions.to(dev, non_blocking=True)
        elif regions is not None and regions.device != dev:
            regions = regions.to(dev, non_blocking=True)
        ids_shuffle, ids_restore = self.random_masking(noise)
        ids_keep, mask = self._prefix_mask(ids_shuffle, ids_restore, len_keep)

        latent = self.forward_encoder(images, ids_keep)

        mae_loss = pred = None
        if self.use_mae_loss:
            pred = self.forward_decoder(latent, ids_restore)
            mae_loss = self.forward_loss(images, pred, mask)

        region_loss = region_pred = region_mask = None
        if self.num_region > 0:
            region_ids_keep, region_mask = self._prefix_mask(ids_shuffle, ids_restore,
                                                             visible_count(N, self.region_mask_ratio, "region_mask_ratio"))
            tokens = self.embed_regions(regions, region_ids_keep)        # [B, k, Lr, De]
            queries = self.forward_region_encoder(tokens)                # [B, k, De]
            memory = self.forward_region_neck(latent, ids_restore)       # [B, N+1, Cd]
            region_pred = self.forward_region_decoder(queries, memory)   # [B, k, N, p*p]
            region_loss = self.forward_region_loss(region_pred, regions, region_mask)

        if mae_loss is not None and region_loss is not None:
            loss = self.mae_loss_weight * mae_loss + self.region_loss_weight * region_loss
        elif mae_loss is not None:
            loss = self.mae_loss_weight * mae_loss
        else:
            loss = self.region_loss_weight * region_loss
        return RMAEOutput(loss=loss, mae_loss=mae_loss, region_loss=region_loss, pred=pred,
                          region_pred=region_pred, mask=mask, region_mask=region_mask, ids_restore=ids_restore)
