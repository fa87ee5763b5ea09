"""Encoder export with timm's ``vit_*_patch16_224`` keys (``num_classes=0``: no head), no decoder.

``cls_token`` [1, 1, D], ``pos_embed`` [1, N+1, D] (fixed sin-cos, zero cls row), ``patch_embed.proj.*``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``. Loads with ``strict=True`` into
``timm.create_model("vit_base_patch16_224", num_classes=0)`` and into ``rmae.models.VisionTransformer``.
"""
from __future__ import annotations

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


def save_encoder(model: Union[nn.Module, Mapping[str, torch.Tensor]], path: str) -> None:
    """Write ``export_encoder(model)`` as safetensors (``.safetensors``) or a torch file (anything else)."""
    state = export_encoder(model)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
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
