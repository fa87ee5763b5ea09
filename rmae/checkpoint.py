"""Checkpoints that resume exactly, on any number of ranks.

A checkpoint is one file ``<run>/checkpoints/ckpt_<step:08d>.pt`` holding full (unsharded) state dicts
gathered to rank 0 with ``torch.distributed.checkpoint.state_dict.get_state_dict`` (so it loads on another
number of ranks, or in a plain single process), keyed by clean parameter names (no ``_orig_mod.`` /
``module.``):

``model``, ``optimizer`` (keyed by parameter name), ``scheduler``, ``scaler``, ``rng`` (one entry per rank:
python, numpy, torch, cuda), ``step``, ``data_position``, ``config``, ``world_size``, ``version``.

Writes are atomic (temporary file, fsync, rename); only the newest ``keep`` checkpoints up to the one just
written are kept (a checkpoint with a higher step is never deleted). A run folder holds one history: files of
an earlier run that the new one does not continue are moved to ``previous/<time>/`` (``set_aside``). Resuming
from the newest checkpoint falls back to the next older one when it cannot be read (``read_latest``).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import socket
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from rmae import distributed as rdist
from rmae.models.export import clean_key
from rmae.logging_utils import logger

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
_CORRUPT = re.compile(r"^ckpt_(\d{8})\.pt\.corrupt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint)."""


class RunFolderInUse(CheckpointError):
    """Another run is writing into the run folder."""


RUN_LOCK = ".run.lock"  # held (flock) by the run writing into the folder; says which process that is

# The descriptors of the run-folder locks this process holds. A flock belongs to the open file, which a fork
# shares: a forked child (a DataLoader worker) that outlives its killed parent by a few seconds would keep the lock
# and refuse the restart, naming the dead process. Each forked child points its copies at /dev/null at once.
_held_lock_fds: set[int] = set()


def _drop_held_locks_in_child() -> None:
    if not _held_lock_fds:
        return
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in _held_lock_fds:  # (dup2, not close: the number stays taken, so no later file reuses it)
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
        os.close(null)
    _held_lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_locks_in_child)


@contextlib.contextmanager
def hold_run_folder(run_dir: str | os.PathLike):
    """Holds ``run_dir``'s lock for the run: a second run into it (a requeued job while the first still runs, a
    retry) would set aside, resume from and prune the first one's files under it. RunFolderInUse names the
    process that holds it. A file system without locks (some NFS, Lustre without flock) gets a note, no lock."""
    try:
        import fcntl
    except ImportError:  # (not POSIX)
        yield
        return
    folder = Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"the run folder {folder} (training.save_dir) is a file, not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    held = False  # (a run refused here must not clean up: the folder is the holder's, even if both made it)
    try:
        with open(folder / RUN_LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunFolderInUse(f"another run is writing into {folder} ({holder}); wait for it to end, or "
                                     "give another training.save_dir") from None
            except OSError as error:
                print(f"note: {folder} cannot be locked ({error.strerror or error}); do not start a second run into "
                      "it until this one ends", file=sys.stderr)
            else:
                held = True
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                handle.flush()
                _held_lock_fds.add(handle.fileno())
            try:
                yield
            finally:
                _held_lock_fds.discard(handle.fileno())
    finally:
        if created and held:  # a run that wrote nothing (e.g. --resume with no checkpoint) leaves no folder
            with contextlib.suppress(OSError):
                if {p.name for p in folder.iterdir()} <= {RUN_LOCK}:
                    (folder / RUN_LOCK).unlink(missing_ok=True)
                    folder.rmdir()


def flush_to_disk(path: str | os.PathLike) -> None:
    """fsync a file written by another library (safetensors) or by ``write_bytes``, before it is renamed over the
    one it replaces: after a power loss the name then holds the old file or the new one, never an empty one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_state_dict(sd: dict) -> dict:
    return {clean_key(k): v for k, v in sd.items()}


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _numbered_files(run_dir: str | os.PathLike, name: re.Pattern) -> list[tuple[int, Path]]:
    """(step, file) of the files in the run's checkpoint folder whose name matches ``name``, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), d / n) for n in os.listdir(d) if (m := name.match(n)))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of an interrupted write are ignored)."""
    return [p for _, p in _numbered_files(run_dir, _NAME)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    c = list_checkpoints(run_dir)
    return c[-1] if c else None


def is_checkpoint_name(path: str | os.PathLike) -> bool:
    """Whether a file is named as a training checkpoint (``ckpt_<8 digits>.pt``)."""
    return _NAME.match(Path(path).name) is not None


def step_of(path: str | os.PathLike) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def corrupt_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, file) of the checkpoints that ``read_latest`` renamed ``*.corrupt``."""
    return _numbered_files(run_dir, _CORRUPT)


def _record(line: bytes) -> dict:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut short by a crash
        return {}
    return record if isinstance(record, dict) else {}


def log_records(log: Path) -> list[dict]:
    """The records of a run log, one per line ({} for a line cut short by a crash); [] when there is no log."""
    return [_record(line) for line in log.read_bytes().splitlines()] if log.is_file() else []


def records_a_step(log: Path) -> bool:
    """Whether a run log records any step (an update, a checkpoint, a resume), not only a start that failed."""
    return any("step" in record for record in log_records(log))


def _log_after(log: Path, step: int) -> int | None:
    """The byte offset in ``log`` where the records of the steps after ``step`` begin (a run that died after its
    last checkpoint wrote them), or where a last line cut short by a crash begins; None when there are none.
    Only records after the newest ``checkpoint`` record of ``step`` count: before it, a skipped try of the next
    update (numbered step + 1) is part of the checkpoint's history (its batch is not tried again)."""
    if not log.is_file():
        return None
    with open(log, "rb") as f:
        lines = f.readlines()
    records = [_record(line) for line in lines]
    start = max((i + 1 for i, r in enumerate(records) if r.get("event") == "checkpoint" and r.get("step") == step),
                default=0)
    offset = sum(len(line) for line in lines[:start])
    for line, record in zip(lines[start:], records[start:]):
        later = isinstance(record.get("step"), int) and record["step"] > step
        if later or not line.endswith(b"\n"):
            return offset
        offset += len(line)
    return None


def set_aside(run_dir: str | os.PathLike, files: tuple[str, ...], keep_up_to: int | None = None,
              later_files: Callable[[Path, int], list[Path]] | None = None) -> Path | None:
    """Moves an earlier history out of the run folder into ``previous/<time>/``, so two runs never mix.

    Starting over (``keep_up_to`` None): every checkpoint and the run's ``files`` (log, config, pictures...), unless
    there is no checkpoint and no log that records a step (a start that failed before its first update is no
    history). Continuing from step ``keep_up_to`` of this folder: only what came after it, so the folder keeps one
    history from step 1: the checkpoints after it (.corrupt ones included), the log's records after it (in
    ``log.after_step_<keep_up_to>.jsonl``; the log keeps the rest) and ``later_files(run_dir, keep_up_to)``
    (pictures of later steps, say), kept at their relative paths. Returns the folder the files went to, or None
    when there was nothing to move."""
    run_dir = Path(run_dir)
    found = _numbered_files(run_dir, _NAME) + corrupt_checkpoints(run_dir)
    later = [p for s, p in found if keep_up_to is None or s > keep_up_to]
    log = run_dir / "log.jsonl"
    if keep_up_to is None:
        if not later and not records_a_step(log):
            return None
        dest = _previous_folder(run_dir)
        if checkpoint_dir(run_dir).is_dir():
            os.replace(checkpoint_dir(run_dir), checkpoint_dir(dest))
        for name in files:
            if (run_dir / name).exists():
                os.replace(run_dir / name, dest / name)
        return dest
    cut = _log_after(log, keep_up_to)
    extra = [p for p in (later_files(run_dir, keep_up_to) if later_files else []) if p.exists()]
    if not later and cut is None and not extra:
        return None
    dest = _previous_folder(run_dir)
    if later:
        checkpoint_dir(dest).mkdir()
        for p in later:
            os.replace(p, checkpoint_dir(dest) / p.name)
    if cut is not None:
        records = log.read_bytes()
        (dest / f"log.after_step_{keep_up_to}.jsonl").write_bytes(records[cut:])
        kept = log.with_name(log.name + ".tmp")
        kept.write_bytes(records[:cut])
        flush_to_disk(kept)
        os.replace(kept, log)
    for p in extra:
        target = dest / p.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    return dest


def _previous_folder(run_dir: Path) -> Path:
    """A new ``previous/<time>`` folder of the run folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / "previous" / stamp, 1
    while dest.exists():
        dest, n = run_dir / "previous" / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    return dest


# ------------------------------------------------------------------------------------------------------------
# RNG
# ------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """The process's RNG states, of types that ``torch.load(weights_only=True)`` reads (numpy's key array as a
    tensor): rmae.models.load_checkpoint loads our checkpoints without unpickling arbitrary objects."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))  # keys: a tensor (or an older array)
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
                    step: int, extra: dict[str, Any], keep: int = 2, is_main: bool = True) -> Path:
    """Collective (every rank calls it): gathers the state, rank 0 writes atomically and prunes old files; returns
    the file written."""
    msd, osd = gather_state(model, optimizer)
    rngs = rdist.all_gather_object(rng_state())

    def write() -> Path:
        d = checkpoint_dir(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"ckpt_{step:08d}.pt"
        payload = {"version": FORMAT_VERSION, "step": step, "model": msd, "optimizer": osd, "rng": rngs,
                   "world_size": len(rngs), **extra}
        # left by a write that was killed: space first (Path.glob: a run folder named with [ ] * ? is no pattern)
        for stale in d.glob(".ckpt_*.tmp.*"):
            stale.unlink(missing_ok=True)
        tmp = d / f".{path.name}.tmp.{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, an interrupt: no partial file stays behind
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename durable
            fd = os.open(d, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
        # older checkpoints beyond ``keep`` (a folder or other non-file that has a checkpoint's name is no
        # checkpoint: neither counted nor touched)
        older = [p for p in list_checkpoints(run_dir) if step_of(p) <= step and (p.is_file() or p.is_symlink())]
        for old in older[:-keep]:
            old.unlink(missing_ok=True)
        return path

    return rdist.from_main_rank(write, is_main)  # (a failed write - a full disk, a quota - is every rank's error)


# What checkpoints of earlier rmae versions pickled besides tensors: numpy's RNG key array (plain data).
_NUMPY_ARRAY_GLOBALS = re.compile(r"numpy\.(_?core\.multiarray\._reconstruct|ndarray|dtype|dtypes\.\w+DType)")


def _numpy_array_globals(path) -> list | None:
    """The objects that rebuild numpy arrays, when those are all the file pickles besides tensors, else None."""
    import importlib

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return None
    if not names or not all(_NUMPY_ARRAY_GLOBALS.fullmatch(name) for name in names):
        return None
    found = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):
            return None
    # the arrays' dtypes are rebuilt from their classes, which the file's globals do not list
    return found + [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]


def damaged_member(path: str | os.PathLike) -> str | None:
    """The first member of a torch zip archive whose bytes do not match their stored CRC-32 (damage that leaves the
    archive's size and directory intact, which a memory-mapped load never notices), else None (also for a file that
    is no zip archive: loading says what it is). Reads the whole file once."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    except Exception as error:  # zlib/struct errors of a mangled member: that member is damaged
        return f"? ({type(error).__name__}: {error})"


def check_checksums(path: str | os.PathLike) -> None:
    """CorruptCheckpoint when a member of the checkpoint's archive does not match its stored CRC-32."""
    damaged = damaged_member(path)
    if damaged is not None:
        raise CorruptCheckpoint(f"checkpoint {path} is damaged: its part {damaged} does not match its checksum")


def read_checkpoint(path: str | os.PathLike, checksums: bool = True) -> dict:
    """The payload of a checkpoint file, tensors memory-mapped (no full copy in RAM). CorruptCheckpoint naming
    the file when it cannot be read, CheckpointError when it has another format version or pickles objects other
    than tensors, plain values and (as earlier rmae versions did) numpy arrays. ``checksums=False``: the archive's
    CRC-32s (one read of the whole file) were checked already (``read_on_all_ranks``: by rank 0 alone)."""
    def load():  # weights_only: tensors and plain values only, so resuming never runs code a file carries
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def unreadable(error: Exception) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})")

    with contextlib.suppress(OSError):  # (an unreadable one: loading says why)
        if os.path.getsize(path) == 0:
            raise CorruptCheckpoint(f"checkpoint {path} is empty (0 bytes: a write that never finished)")
    if checksums:
        check_checksums(path)
    try:
        payload = load()
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # damaged bytes inside an intact archive
            raise unreadable(e) from e
        arrays = _numpy_array_globals(path)
        if arrays is None:
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors, plain values and numpy arrays "
                f"({found.group(1)}), which rmae's checkpoints never do: not loaded, so that resuming never runs "
                "code a file carries") from e
        try:
            with torch.serialization.safe_globals(arrays):
                payload = load()
        except Exception as again:
            raise unreadable(again) from again
    except (OSError, MemoryError) as e:
        if isinstance(e, OSError) and e.errno is None:  # raised on the file's content
            raise unreadable(e) from e
        # the file system or the machine (EIO, a stale NFS handle, no memory), not the file: it is not set aside as
        # damaged, and the run does not fall back to an older checkpoint
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); this is not taken as "
                              "damage to the file: resume again once the cause is fixed") from e
    except Exception as e:  # truncated or damaged zip, ...
        raise unreadable(e) from e
    if not isinstance(payload, dict) or "model" not in payload or "step" not in payload:
        raise CorruptCheckpoint(f"checkpoint {path} is not an rmae checkpoint (no model state or step)")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')!r}; this version "
                              f"of rmae reads version {FORMAT_VERSION}")
    return payload


def read_on_all_ranks(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """``read_checkpoint`` on every rank (collective): the same error on all when one rank fails. A file that
    rank 0 sees and another rank does not (a run folder on a node's own disk) is a CheckpointError naming the
    ranks and hosts; one rank 0 does not see either is a FileNotFoundError (``what``: how the error names it)."""
    path = Path(path)
    found = rdist.all_gather_object((path.is_file(), path.exists(), socket.gethostname()))
    if not found[0][0]:
        raise FileNotFoundError(f"{what} {path} " + ("is not a file" if found[0][1] else "does not exist"))
    blind = [f"rank {rank} on {host}" for rank, (is_file, _, host) in enumerate(found) if not is_file]
    if blind:
        raise CheckpointError(f"{what} {path} is there for rank 0 ({found[0][2]}) but not for "
                              f"{', '.join(blind)}: every rank reads it, so the run folder (training.save_dir, "
                              "as an absolute path) must be on a file system that all nodes share")
    # the checksums by rank 0 alone (one read of a file of several GB, not one per rank), then every rank loads it
    rdist.from_main_rank(lambda: check_checksums(path), rdist.is_main_rank())
    return rdist.on_every_rank(lambda: read_checkpoint(path, checksums=False))


def read_latest(run_dir: str | os.PathLike, is_main: bool = True) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint of the run that can be read, its payload, and the newer ones that could not.

    A newer unreadable checkpoint is reported with a warning and, once an older one has loaded, renamed
    ``*.corrupt`` (kept to look at, not retried). When none can be read, nothing is renamed and a
    CheckpointError names every file. (None, None, []) when the run has no checkpoint."""
    bad: list[tuple[Path, str]] = []
    # rank 0's listing (another rank may list a node-local folder or a stale one: read_on_all_ranks then says so)
    for path in reversed(rdist.from_main_rank(lambda: list_checkpoints(run_dir), is_main)):
        try:
            payload = read_on_all_ranks(path)
        except CorruptCheckpoint as e:
            if is_main:
                logger.warning("%s; trying the next older checkpoint", e)
            bad.append((path, str(e)))
            continue
        rdist.barrier()  # every rank has given up on the bad files before rank 0 renames them

        def rename_bad() -> None:
            for p, _ in bad:
                os.replace(p, p.with_name(p.name + ".corrupt"))
                logger.warning("resuming from %s; the unreadable %s is renamed %s.corrupt", path, p, p.name)

        rdist.from_main_rank(rename_bad, is_main)  # (a rename that fails: every rank's error)
        return path, payload, [str(p) for p, _ in bad]
    if bad:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)} can be read:\n  "
                              + "\n  ".join(m for _, m in bad)
                              + "\nto start over, set training.resume=false (they are then moved to previous/ in "
                              "the run folder), or set training.resume_file to a good checkpoint")
    return None, None, []


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    rank: int = 0, payload: dict | None = None) -> dict:
    """Loads model (and optimizer) state into possibly sharded modules; returns the rest of the payload.

    Every rank memory-maps the file (no full copy in RAM) and keeps its own shards of the full state, so a
    checkpoint written by any number of ranks loads on any other number. ``payload``: the file already read
    (``read_checkpoint``).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    payload = dict(payload) if payload is not None else read_checkpoint(path)
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
