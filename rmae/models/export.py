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


def encoder_metadata(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict[str, str]:
    """What an exported encoder is: ``embed_dim``, ``depth``, ``patch_size``, ``in_chans``, ``mlp_ratio`` and
    ``img_size`` (pixels; only for a square grid of positions) from the shapes; ``num_heads`` (not in the weights)
    as given, else the standard one of the size (``num_heads_from`` says which); ``timm_model`` when timm's model
    of that name has all of these (its ``img_size`` argument aside). Strings, as safetensors stores metadata;
    ``format: pt`` as timm's own files."""
    patch = state["patch_embed.proj.weight"]  # [D, C, p, p]
    width, in_chans, size = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    positions = state["pos_embed"].shape[1] - 1  # pos_embed [1, 1 + g*g, D]
    grid = math.isqrt(max(positions, 0))
    meta = {"format": "pt", "producer": "rmae", "embed_dim": str(width), "depth": str(depth),
            "patch_size": str(size), "in_chans": str(in_chans)}
    if grid * grid == positions and grid > 0:
        meta["img_size"] = str(grid * size)
    if "blocks.0.mlp.fc1.weight" in state:
        meta["mlp_ratio"] = f"{state['blocks.0.mlp.fc1.weight'].shape[0] / width:g}"
    standard = _TIMM_VIT.get((width, depth, size))
    if num_heads is not None:
        meta["num_heads"], meta["num_heads_from"] = str(num_heads), "the model"
    elif standard is not None:
        meta["num_heads"], meta["num_heads_from"] = str(standard[1]), "the standard for this size (not in the weights)"
    if (standard is not None and meta.get("num_heads") == str(standard[1]) and meta.get("mlp_ratio") == "4"
            and in_chans == 3 and "img_size" in meta):
        meta["timm_model"] = standard[0]
    return meta


def timm_call(meta: Mapping[str, str]) -> str:
    """The ``timm.create_model(...)`` call that builds the exported encoder's model, or ``""`` where timm has no
    model of its shape."""
    if "timm_model" not in meta:
        return ""
    size = "" if meta["img_size"] == "224" else f", img_size={meta['img_size']}"
    return f'timm.create_model("{meta["timm_model"]}", num_classes=0{size})'


def model_num_heads(model: nn.Module) -> int | None:
    """The encoder's attention head count (of its first block), or None where the module has no blocks."""
    blocks = getattr(model, "blocks", None)
    return getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks else None


def save_encoder(model: Union[nn.Module, Mapping[str, torch.Tensor]], path: str,
                 num_heads: int | None = None) -> dict[str, str]:
    """Write ``export_encoder(model)`` as safetensors (``.safetensors``, with ``encoder_metadata`` in its header;
    ``num_heads``: the model's, read from it when a module is given) or a torch file (anything else); returns
    the ``encoder_metadata``."""
    state = export_encoder(model)
    if num_heads is None and isinstance(model, nn.Module):
        num_heads = model_num_heads(model)
    meta = encoder_metadata(state, num_heads)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=meta)
        os.chmod(path, 0o666 & ~current_umask())  # safetensors creates the file 0600: others could not read it
    else:
        torch.save(state, path)
    return meta


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
    ``"model"``. ``_orig_mod.`` / ``module.`` prefixes are stripped; ``model`` may be a ``torch.compile`` wrapper.
    Returns ``load_state_dict``'s result.
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
    # a torch.compile wrapper expects its keys under _orig_mod.: the clean keys go to the model it wraps
    return getattr(model, "_orig_mod", model).load_state_dict(state, strict=strict)


if __name__ == "__main__":  # the command's first name (2026-11-29): python -m rmae.export
    from rmae.export import main

    raise SystemExit(main())
