"""Encoder export with timm's ``vit_*_patch16_224`` keys (``num_classes=0``: no head), no decoder.

``cls_token`` [1, 1, D], ``pos_embed`` [1, N+1, D] (fixed sin-cos, zero cls row), ``patch_embed.proj.*``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``. Loads with ``strict=True`` into
``timm.create_model("vit_base_patch16_224", num_classes=0)`` and into ``rmae.models.VisionTransformer``.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Union

import torch
import torch.nn as nn

_ENCODER_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|blocks\.\d+\..+|norm\.(weight|bias))$")
_PREFIXES = ("_orig_mod.", "module.")


def clean_key(key: str) -> str:
    """Drops torch.compile (``_orig_mod.``) and DDP (``module.``) wrapper prefixes at any depth
    (``_orig_mod.blocks.0._orig_mod.norm1.weight`` -> ``blocks.0.norm1.weight``)."""
    while True:  # until nothing changes: doubled wrappers (a._orig_mod._orig_mod.b), module._orig_mod. at the start
        before = key
        for p in _PREFIXES:
            key = key.replace("." + p, ".")
            while key.startswith(p):
                key = key[len(p):]
        if key == before:
            return key


def export_encoder(model: Union[nn.Module, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The pixel encoder's weights (detached, contiguous clones) from a model, a state_dict, or a checkpoint
    dict holding one under ``"model"`` (as the MAE / R-MAE releases)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state, Mapping):
        raise ValueError(f"not a model state: expected a module or a mapping of tensors, got {type(state).__name__}")
    if "model" in state and isinstance(state["model"], Mapping):  # MAE / R-MAE checkpoint files: {"model": ...}
        state = state["model"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = clean_key(key)
        if _ENCODER_KEY.match(key):
            out[key] = value.detach().clone().contiguous()
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight") if k not in out]
    if missing:
        raise ValueError(f"not an R-MAE/MAE state: encoder keys {missing} are missing")
    return out


# timm's name and head count for each width (the ViT sizes of the MAE / R-MAE papers and timm's defaults)
_TIMM_VIT = {(192, 12, 16): ("vit_tiny_patch16_224", 3), (384, 12, 16): ("vit_small_patch16_224", 6),
             (768, 12, 16): ("vit_base_patch16_224", 12), (1024, 24, 16): ("vit_large_patch16_224", 16),
             (1280, 32, 14): ("vit_huge_patch14_224", 16)}


def encoder_metadata(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """What an exported encoder is, read from its shapes: ``embed_dim``, ``depth``, ``patch_size``, ``img_size``
    (pixels, square) and, for the standard sizes, ``timm_model`` and ``num_heads`` (the head count is not in
    the weights). Strings, as safetensors stores metadata; ``format: pt`` as timm's own files."""
    patch = state["patch_embed.proj.weight"]  # [D, C, p, p]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = math.isqrt(max(state["pos_embed"].shape[1] - 1, 0))  # pos_embed [1, 1 + g*g, D]
    meta = {"format": "pt", "producer": "rmae", "embed_dim": str(patch.shape[0]), "depth": str(depth),
            "patch_size": str(patch.shape[-1]), "in_chans": str(patch.shape[1]), "img_size": str(grid * patch.shape[-1])}
    name = _TIMM_VIT.get((patch.shape[0], depth, patch.shape[-1]))
    if name is not None:
        meta["timm_model"], meta["num_heads"] = name[0], str(name[1])
    return meta


def timm_call(meta: Mapping[str, str]) -> str:
    """The ``timm.create_model(...)`` call that builds the exported encoder's model, or ``""`` for a size
    timm has no name for."""
    if "timm_model" not in meta:
        return ""
    size = "" if meta["img_size"] == "224" else f", img_size={meta['img_size']}"
    return f'timm.create_model("{meta["timm_model"]}", num_classes=0{size})'


def save_encoder(model: Union[nn.Module, Mapping[str, torch.Tensor]], path: str) -> None:
    """Write ``export_encoder(model)`` as safetensors (``.safetensors``, with ``encoder_metadata`` in its header)
    or a torch file (anything else)."""
    state = export_encoder(model)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=encoder_metadata(state))
        os.chmod(path, 0o666 & ~current_umask())  # safetensors creates the file 0600: others could not read it
    else:
        torch.save(state, path)


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so that no other thread sees it change)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(model: nn.Module, source, strict: bool = True, weights_only: bool = True):
    """Load a full model state (ours, the official R-MAE's or MAE's; the names are the same) into ``model``.

    ``source``: a path (``.safetensors`` or a torch file), a state_dict, or a checkpoint dict holding it under
    ``"model"``. ``_orig_mod.`` / ``module.`` prefixes are stripped. Returns ``load_state_dict``'s result.
    Official MAE/R-MAE files that pickle other objects (e.g. ``args``) need ``weights_only=False``: only for
    files you trust.
    """
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        path = os.fsdecode(source)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            source = load_file(path)
        else:
            source = torch.load(path, map_location="cpu", weights_only=weights_only)
    if "model" in source and isinstance(source["model"], Mapping):
        source = source["model"]
    state = {clean_key(k): v for k, v in source.items()}
    return model.load_state_dict(state, strict=strict)


if __name__ == "__main__":  # the command's first name (2026-11-29): python -m rmae.export
    from rmae.export import main

    raise SystemExit(main())
