"""One PNG per call: a title line (the step, and how to read the region tiles), a header row naming the columns,
then for each image a row of

    input | masked | reconstruction + visible | target 1 | pred 1 | ... | target k | pred k

Every one of the k regions is shown as a pair of tiles: the binary target map (grey), then sigmoid(logit) in grey
on the removed patches, and the given target in blue on the visible ones (the model sees those: they are no
prediction). A model without a pixel decoder (RAE) has no reconstruction column, one without regions (MAE) no
region columns. Pixel reconstructions of a ``norm_pix_loss`` model are de-normalised with the statistics of the
true patches, as MAE's demo does; the visible patches are pasted back, as there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
PAD = 2  # white pixels around each tile


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] normalized -> [H, W, 3] uint8."""
    x = (img.float().cpu() * STD + MEAN).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _gray(x: torch.Tensor) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8."""
    g = (x.float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


# the given (visible) patches of a region prediction tile: 0 -> dark blue, 1 -> light blue
GIVEN_OFF = np.array([25, 35, 90], dtype=np.float32)
GIVEN_ON = np.array([120, 170, 255], dtype=np.float32)


def _prediction_tile(probs: torch.Tensor, target: torch.Tensor, removed: torch.Tensor) -> np.ndarray:
    """[H, W] probabilities, binary target and 1-on-removed-patches mask -> [H, W, 3] uint8: grey probabilities
    where removed, the target in blue where visible."""
    grey = _gray(probs).astype(np.float32)
    t = target.float().clamp(0, 1).cpu().numpy()[..., None]
    given = GIVEN_OFF + (GIVEN_ON - GIVEN_OFF) * t
    r = removed.float().cpu().numpy()[..., None]
    return (grey * r + given * (1 - r) + 0.5).astype(np.uint8)


def _patch_mask_image(mask: torch.Tensor, grid: int, p: int) -> torch.Tensor:
    """[N] 1 = removed -> [H, W] float."""
    return mask.float().view(grid, grid).repeat_interleave(p, 0).repeat_interleave(p, 1)


@torch.no_grad()
def render(model, images: torch.Tensor, regions, out, title: str | None = None) -> np.ndarray:
    """The picture as an [H, W, 3] uint8 array (see module doc); ``title`` starts its first line."""
    images = images.float().cpu()
    B, _, H, W = images.shape
    p = model.patch_size
    grid = H // p
    rows = []
    maps = None
    if regions is not None:
        maps = regions.to_maps() if hasattr(regions, "to_maps") else regions
        maps = maps.cpu()
    for i in range(B):
        tiles = [_to_uint8(images[i])]
        mask_img = _patch_mask_image(out.mask[i].cpu(), grid, p)
        tiles.append(_to_uint8(images[i] * (1 - mask_img)[None] + (mask_img[None] * (-MEAN / STD))))
        if out.pred is not None:
            pred = out.pred[i:i + 1].float().cpu()  # [1, N, p*p*3]
            if getattr(model, "norm_pix_loss", False):
                target = model.patchify(images[i:i + 1])
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)
                pred = pred * (var + 1e-6) ** 0.5 + mean
            rec = model.unpatchify(pred)[0]
            rec = images[i] * (1 - mask_img)[None] + rec * mask_img[None]
            tiles.append(_to_uint8(rec))
        if maps is not None and out.region_pred is not None:
            k = maps.shape[1]
            logits = out.region_pred[i].float().cpu()  # [k, N, p*p]
            probs = torch.sigmoid(logits).view(k, grid, grid, p, p).permute(0, 1, 3, 2, 4).reshape(k, H, W)
            rmask = out.region_mask[i].cpu() if out.region_mask is not None else out.mask[i].cpu()
            rmask_img = _patch_mask_image(rmask, grid, p)
            for j in range(k):
                target = maps[i, j].float()
                tiles.append(_gray(target))
                tiles.append(_prediction_tile(probs[j], target, rmask_img))
        rows.append(np.concatenate([np.pad(t, ((PAD, PAD), (PAD, PAD), (0, 0)), constant_values=255) for t in tiles],
                                   1))
    names = ["input", "masked"] + (["reconstruction + visible"] if out.pred is not None else [])
    with_regions = maps is not None and out.region_pred is not None
    if with_regions:
        names += [name for j in range(1, maps.shape[1] + 1) for name in (f"target {j}", f"pred {j}")]
    lines = [title] if title else []
    if with_regions:
        lines += ["pred: grey = predicted probability on the masked patches, blue = the given target on the "
                  "visible patches (no prediction)"]
    top = [text_lines(lines, len(names) * (W + 2 * PAD))] if lines else []
    return np.concatenate([*top, header(names, W + 2 * PAD), *rows], 0)


def text_lines(lines: list[str], width: int) -> np.ndarray:
    """[h, width, 3] uint8: the lines left-aligned, each cut to the width (wrapped at words where it fits)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[str] = []
    for line in lines:
        current = ""
        for word in line.split(" "):
            trial = f"{current} {word}".strip()
            if current and draw.textlength(trial, font=font) > width - 4:
                wrapped.append(current)
                current = word
            else:
                current = trial
        wrapped.append(current)
    canvas = Image.new("RGB", (width, 12 * len(wrapped) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(wrapped):
        draw.text((2, 1 + 12 * n), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def header(names: list[str], tile_width: int) -> np.ndarray:
    """[h, len(names) * tile_width, 3] uint8: each name centred over its column (shortened to fit)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    height = 14
    canvas = Image.new("RGB", (len(names) * tile_width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        short = {"reconstruction + visible": "recon.", "masked": "mask"}.get(
            name, name.replace("target ", "t").replace("pred ", "p"))
        for text in (name, short, short[:max(tile_width // 7, 1)]):
            if draw.textlength(text, font=font) <= tile_width - 2:
                break
        left = i * tile_width + (tile_width - draw.textlength(text, font=font)) / 2
        draw.text((left, 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_visualization(path: str | Path, model, images, regions, out, title: str | None = None) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = render(model, images, regions, out, title)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(arr).save(tmp)
    tmp.replace(path)
    return path
