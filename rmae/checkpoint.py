"""Checkpoints that resume exactly, on any number of ranks.

A checkpoint is one file ``<run>/checkpoints/ckpt_<step:08d>.pt`` holding full (unsharded) state dicts
gathered to rank 0 with ``torch.distributed.checkpoint.state_dict.get_state_dict`` (so it loads on another
number of ranks, or in a plain single process), keyed by clean parameter names (no ``_orig_mod.`` /
``module.``):

``model``, ``optimizer`` (keyed by parameter name), ``scheduler``, ``scaler``, ``rng`` (one entry per rank:
python, numpy, torch, cuda), ``step``, ``data_position``, ``config``, ``world_size``, ``version``.

Writes are atomic (temporary file, fsync, rename); only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import glob
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from rmae import distributed as rdist

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
_PREFIXES = ("_orig_mod.", "module.")


def clean_key(key: str) -> str:
    """Drops torch.compile / DDP wrapper prefixes at any depth (``a._orig_mod.b`` -> ``a.b``)."""
    for p in _PREFIXES:
        key = key.replace("." + p, ".")
        while key.startswith(p):
            key = key[len(p):]
    return key


def clean_state_dict(sd: dict) -> dict:
    return {clean_key(k): v for k, v in sd.items()}


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of an interrupted write are ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / n) for n in os.listdir(d) if (m := _NAME.match(n))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    c = list_checkpoints(run_dir)
    return c[-1] if c else None


# ------------------------------------------------------------------------------------------------------------
# RNG
# ------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------------------
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts (on CPU; complete on rank 0) with clean parameter names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options(cpu_offload=True))
    msd = clean_state_dict(msd)
    if "state" in osd:
        osd = dict(osd)
        osd["state"] = clean_state_dict(osd["state"])
        osd["param_groups"] = [dict(g, params=[clean_key(p) for p in g["params"]]) for g in osd["param_groups"]]
    return msd, osd


def save_checkpoint(run_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, extra: dict[str, Any], keep: int = 2, is_main: bool = True) -> Path | None:
    """Collective (every rank calls it): gathers the state, rank 0 writes atomically and prunes old files."""
    msd, osd = gather_state(model, optimizer)
    rngs = rdist.all_gather_object(rng_state())
    path = None
    if is_main:
        d = checkpoint_dir(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"ckpt_{step:08d}.pt"
        payload = {"version": FORMAT_VERSION, "step": step, "model": msd, "optimizer": osd, "rng": rngs,
                   "world_size": len(rngs), **extra}
        tmp = d / f".{path.name}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename durable
            fd = os.open(d, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
        for stale in glob.glob(str(d / ".ckpt_*.tmp.*")):
            if not stale.endswith(f".{os.getpid()}"):
                Path(stale).unlink(missing_ok=True)
    rdist.barrier()
    return path


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    rank: int = 0) -> dict:
    """Loads model (and optimizer) state into possibly sharded modules; returns the rest of the payload.

    Every rank memory-maps the file (no full copy in RAM) and keeps its own shards of the full state, so a
    checkpoint written by any number of ranks loads on any other number.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format {payload.get('version')!r}")
    msd = clean_state_dict(payload.pop("model"))
    osd = payload.pop("optimizer")
    if optimizer is None:
        set_model_state_dict(model, msd, options=_options())
    else:
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_options())
    rdist.barrier()
    return payload


def restore_rng(meta: dict, rank: int, world_size: int, seed: int) -> None:
    """Same rank count: each rank gets its own state back. Otherwise rank 0's, and the others a fresh seed
    (the loop's randomness - masks and data - is keyed by step and seed, so it does not depend on this)."""
    rngs = meta.get("rng") or []
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
    elif rank == 0 and rngs:
        set_rng_state(rngs[0])
    else:
        seed_everything(seed + rank + 1000003 * int(meta.get("step", 0)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
