"""``python -m rmae.export CHECKPOINT OUT``: the encoder of a checkpoint with timm's ViT keys.

A training checkpoint (``checkpoints/ckpt_<step>.pt``, e.g. of an interrupted run, which writes no
``encoder.safetensors``) or an official MAE / R-MAE file (``--trust`` for those that pickle their arguments).
Exit status 0, or 2 with ``error: ...`` when the file cannot be read, holds no encoder or the output cannot be
written (nothing partial is left behind).
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m rmae.export: a Ctrl-C while the libraries load exits quietly (rmae.cli)
    from rmae.cli import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading()

import argparse
import os
import pickle
import re
import sys

import torch

from rmae.checkpoint import damaged_member, flush_to_disk, is_checkpoint_name, latest_checkpoint
from rmae.cores import command_name
from rmae.models.export import export_encoder, save_encoder, timm_call


def read_state(path: str, trust: bool) -> dict:
    """The object a torch file holds (tensors memory-mapped where the file's format allows)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # a file in the format before torch 1.6 (not a zip archive): no memory map
        return torch.load(path, map_location="cpu", weights_only=not trust)


def recorded_num_heads(path: str) -> int | None:
    """The head count an encoder file of ours records as the model's (its safetensors header), else None."""
    if not path.endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return int(meta["num_heads"]) if meta.get("num_heads_from") == "the model" else None
    except Exception:  # another producer's header, or none
        return None


def config_num_heads(checkpoint) -> int | None:
    """The encoder's head count from the config a training checkpoint of ours carries (``"config"``), else None."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), str):
        return None
    try:
        from omegaconf import OmegaConf

        from rmae.models.export import model_num_heads
        from rmae.train import build_model_from_config

        return model_num_heads(build_model_from_config(OmegaConf.create(checkpoint["config"]), "meta"))
    except Exception:  # another program's "config", an older layout: the heads stay unknown
        return None


def _looks_like_torch_file(path: str) -> bool:
    """A zip archive (torch.save since 1.6), a pickle (before) or a safetensors file (8 bytes of header size, then
    its JSON header): its first bytes (an empty file is none of them)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return True  # (the load says why it cannot be read)
    return head[:2] == b"PK" or head[:1] == b"\x80" or head[8:9] == b"{"


def _overwrites_a_checkpoint(checkpoint: str, out: str) -> str | None:
    """Why the output may not be written there: the checkpoint read, or a training checkpoint's name."""
    if os.path.exists(out) and os.path.exists(checkpoint) and os.path.samefile(checkpoint, out):
        return "the checkpoint it exports"
    if is_checkpoint_name(out):  # also a new one: resuming would take it for the run's newest checkpoint
        return ("named as a training checkpoint (ckpt_<step>.pt: a run's weights and optimizer state, which resuming "
                "reads)")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=command_name("rmae-export", "rmae.export"),
                                     description="Export the encoder of a checkpoint with timm's ViT keys.")
    parser.add_argument("checkpoint", help="a training checkpoint (checkpoints/ckpt_<step>.pt) or a model file")
    parser.add_argument("out", help="the encoder file: .safetensors, or a torch file for any other suffix")
    parser.add_argument("--trust", action="store_true",
                        help="unpickle any object (official files that store their args); only for files you trust")
    args = parser.parse_args(argv)
    if os.path.isdir(args.out) or args.out.endswith(("/", os.sep)):
        print(f"error: {args.out} is a folder: give the encoder file's name, e.g. "
              f"{os.path.join(args.out, 'encoder.safetensors')}", file=sys.stderr)
        return 2
    if os.path.isdir(args.checkpoint):  # a run folder: its newest checkpoint
        newest = latest_checkpoint(args.checkpoint)
        if newest is None:
            print(f"error: {args.checkpoint} is a folder without checkpoints (checkpoints/ckpt_<step>.pt): give a "
                  "checkpoint file, or a run folder that has some", file=sys.stderr)
            return 2
        print(f"exporting {newest}, the newest checkpoint of the run folder {args.checkpoint}")
        args.checkpoint = str(newest)
    tmp = f"{args.out}.tmp{os.getpid()}{os.path.splitext(args.out)[1]}"  # the same suffix: the same format
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        print(f"error: the folder of {args.out} ({folder}) does not exist", file=sys.stderr)
        return 2
    overwrites = _overwrites_a_checkpoint(args.checkpoint, args.out)
    if overwrites:
        print(f"error: {args.out} is {overwrites}: the encoder would replace it (the arguments are CHECKPOINT, then "
              "OUT); give another output file", file=sys.stderr)
        return 2
    if os.path.isfile(args.checkpoint) and not _looks_like_torch_file(args.checkpoint):  # an image, a text file, ...
        print(f"error: {args.checkpoint} is not a torch checkpoint (neither a zip archive nor a pickle: checkpoints "
              "are the runs' checkpoints/ckpt_<step>.pt files; exported encoders are .safetensors)", file=sys.stderr)
        return 2
    damaged = damaged_member(args.checkpoint)
    if damaged is not None:
        print(f"error: {args.checkpoint} is damaged: its part {damaged} does not match its checksum (an earlier "
              "checkpoint of the run may be intact)", file=sys.stderr)
        return 2
    try:
        checkpoint = read_state(args.checkpoint, args.trust)
        state = export_encoder(checkpoint)
        heads = config_num_heads(checkpoint)
        meta = save_encoder(state, tmp, num_heads=heads if heads is not None else recorded_num_heads(args.checkpoint))
        flush_to_disk(tmp)
        os.replace(tmp, args.out)
    except pickle.UnpicklingError as e:
        if not _looks_like_torch_file(args.checkpoint):  # an image, a text file, ...
            print(f"error: {args.checkpoint} is not a torch checkpoint (neither a zip archive nor a pickle: "
                  "checkpoints are the runs' checkpoints/ckpt_<step>.pt files)", file=sys.stderr)
        elif args.trust:
            print(f"error: {args.checkpoint} is not a torch checkpoint ({str(e).splitlines()[-1].strip()})",
                  file=sys.stderr)
        else:  # (PyTorch's message: its advice with terminal escape codes, then the line that names the object)
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            named = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), None)
            print(f"error: {args.checkpoint} holds objects other than tensors"
                  + (f" ({named})" if named else "") + "; add --trust if you trust the file", file=sys.stderr)
        return 2
    except Exception as e:  # unreadable input, no encoder in it, an output that cannot be written
        cut_off = (isinstance(e, OSError) and e.errno == 22) or (
            isinstance(e, RuntimeError) and ("PytorchStreamReader" in str(e) or "zip archive" in str(e)))
        if cut_off and os.path.isfile(args.checkpoint):  # a cut-off archive
            print(f"error: {args.checkpoint} cannot be read as a torch checkpoint (truncated or damaged: {e})",
                  file=sys.stderr)
        else:
            print(f"error: cannot export the encoder of {args.checkpoint} to {args.out}: {e}", file=sys.stderr)
        return 2
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    size = f"{meta['img_size']} px" if "img_size" in meta else "positions of a non-square grid"
    heads = "" if "num_heads" not in meta else f", {meta['num_heads']} heads" + (
        "" if meta["num_heads_from"] == "the model" else " (assumed: the standard for this size)")
    print(f"{args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} parameters "
          f"(ViT {meta['embed_dim']} wide, {meta['depth']} blocks, patch {meta['patch_size']}, {size}{heads})")
    call = timm_call(meta)
    if call:
        print(f"load it with: model = {call}; model.load_state_dict(safetensors.torch.load_file({args.out!r}))"
              if args.out.endswith(".safetensors") else
              f"load it with: model = {call}; model.load_state_dict(torch.load({args.out!r}))")
    return 0


if __name__ == "__main__":
    from rmae.cli import ctrl_c_as_usual

    ctrl_c_as_usual()
    raise SystemExit(main())
