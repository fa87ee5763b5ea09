"""Process-group set-up for every way of launching, and FSDP2 sharding.

Launch modes (``resolve_launch``):

* ``torchrun`` (single or multi node): RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are set.
* Slurm ``srun`` with one task per GPU: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR is the first
  host of SLURM_JOB_NODELIST (``scontrol show hostnames``, or a small parser when scontrol is missing).
* plain ``python -m rmae.train`` on a node with several GPUs: one process per visible GPU is spawned
  (``distributed.no_spawn=true`` keeps one process; ``distributed.world_size`` picks how many).
* otherwise one process (CPU or one GPU).

Backend: nccl on CUDA, gloo on CPU (``distributed.backend`` overrides).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from rmae.config import ConfigError

T = TypeVar("T")

_joined_a_group = False  # whether this process has initialized a process group (it is a rank of several)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ------------------------------------------------------------------------------------------------------------
# Slurm
# ------------------------------------------------------------------------------------------------------------
def expand_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,07],gpu5`` -> [node01, node02, node03, node07, gpu5] (scontrol's expansion, simple forms)."""
    hosts, parts, depth, cur = [], [], 0, ""
    for ch in nodelist:  # split on commas outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                a, b = r.split("-", 1)
                for n in range(int(a), int(b) + 1):
                    hosts.append(f"{prefix}{str(n).zfill(len(a))}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def slurm_master_addr(nodelist: str) -> str:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def slurm_step_tasks(env: dict) -> int:
    """Tasks of the Slurm job step this process belongs to: > 1 only for a task started by ``srun`` with several
    tasks. 0 outside a step: a batch script (sbatch) or an salloc shell also carries SLURM_PROCID=0 and the
    allocation's SLURM_NTASKS, but it is one process, not rank 0 of them (only srun sets SLURM_STEP_ID)."""
    if "SLURM_PROCID" not in env or not ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return 0
    return int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))))


def slurm_allocation_unused(env: dict | None = None) -> str | None:
    """A warning when this process runs in a Slurm allocation of several tasks without ``srun`` (and without
    torchrun): it trains on its own node's devices only."""
    env = os.environ if env is None else env
    tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
    if "RANK" in env or "SLURM_PROCID" not in env or slurm_step_tasks(env) or tasks <= 1:
        return None
    return (f"running inside a Slurm allocation of {tasks} tasks but not started by srun: this process trains "
            "alone (on this node's devices); start it with 'srun python -m rmae.train ...' to train on all tasks")


def _slurm_int(env, key: str) -> int:
    try:
        return int(env.get(key, "0"))
    except ValueError:  # e.g. SLURM_STEP_ID=batch / extern
        return 0


def apply_slurm_env(env: dict | None = None) -> bool:
    """In a task that ``srun`` started (and not torchrun), fill the torch.distributed variables from Slurm's.
    True if applied."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return False
    ntasks = slurm_step_tasks(env)
    if ntasks <= 1:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:  # the step's first node: an srun on part of the allocation runs there
        nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)),
                        "127.0.0.1")
        env["MASTER_ADDR"] = slurm_master_addr(nodelist)
    if "MASTER_PORT" not in env:  # per job and step: two steps of one job (in parallel or one after the other) differ
        job, step = _slurm_int(env, "SLURM_JOB_ID"), _slurm_int(env, "SLURM_STEP_ID")
        env["MASTER_PORT"] = str(20000 + (job * 97 + step) % 20000)
    return True


# ------------------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_device(device_pref: str | None, world_size: int = 1) -> int | None:
    """``training.device``: null (cuda when available, else cpu), ``cpu``, ``cuda`` (each rank the GPU of its
    local rank) or ``cuda:N`` (GPU N, one process). ConfigError when CUDA is asked for and not available, when N
    is not a visible GPU, or for ``cuda:N`` with several processes. Returns N for ``cuda:N``, else None."""
    if device_pref is None or device_pref == "cpu":
        return None
    m = re.fullmatch(r"cuda(?::(\d+))?", device_pref)
    if m is None:
        raise ConfigError(f"training.device={device_pref!r} is not valid: use cpu, cuda, cuda:N (one process on "
                          "GPU N), or null (cuda when available, else cpu)")
    if not torch.cuda.is_available():
        raise ConfigError(f"training.device={device_pref!r} but CUDA is not available here "
                          "(torch.cuda.is_available() is false): use training.device=cpu, or null for cuda when "
                          "available, else cpu")
    if m.group(1) is None:
        return None
    index, count = int(m.group(1)), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"training.device={device_pref!r} but {count} CUDA device(s) are visible "
                          f"(cuda:0 to cuda:{count - 1})")
    if world_size > 1:
        raise ConfigError(f"training.device={device_pref!r} names one GPU but the run has {world_size} processes, "
                          "each on the GPU of its local rank: use training.device=cuda (CUDA_VISIBLE_DEVICES "
                          "chooses the GPUs)")
    return index


def resolve_launch(dist_cfg: dict, device_pref: str | None) -> int:
    """How many processes this launcher should spawn: 0 when the environment already defines the ranks
    (torchrun / srun) or when one process is enough. Checks ``training.device`` first (``check_device``)."""
    apply_slurm_env()
    unused = slurm_allocation_unused()
    if unused:
        warnings.warn(unused, stacklevel=2)
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if "RANK" not in os.environ and world != "1":  # e.g. left exported from an earlier torchrun session
        raise ValueError(f"WORLD_SIZE={world} is set but RANK is not: torchrun and srun set both for each rank they "
                         "start, and this command spawns ranks itself with distributed.world_size; unset WORLD_SIZE "
                         "to train in one process")
    if "RANK" in os.environ and world != "1" and not os.environ.get("MASTER_ADDR"):
        raise ValueError(f"RANK and WORLD_SIZE={world} are set but MASTER_ADDR is not: the ranks cannot find each "
                         "other; start them with torchrun or srun, which set it")
    if "RANK" in os.environ:
        check_device(device_pref, int(world))
        return 0
    one_gpu = check_device(device_pref, 1) is not None
    if dist_cfg.get("no_spawn"):
        return 0
    if (device_pref or "cuda").startswith("cpu") or not torch.cuda.is_available():
        n = dist_cfg.get("world_size") or 1  # CPU: several gloo processes only when asked for
    elif one_gpu:  # cuda:N: one process on GPU N
        n = dist_cfg.get("world_size") or 1
        check_device(device_pref, n)
    else:
        n = dist_cfg.get("world_size") or torch.cuda.device_count()
    return n if n > 1 else 0


def spawn_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def uses_cuda(device_pref: str | None) -> bool:
    """Whether the run's processes use CUDA devices: ``training.device`` null (when there is one), cuda, cuda:N."""
    return torch.cuda.is_available() and not (device_pref or "").startswith("cpu")


def gpu_ids() -> tuple[list[str], str]:
    """The UUIDs of the GPUs this process sees, and of the one it uses (the current device)."""
    def uuid(index: int) -> str:
        return str(getattr(torch.cuda.get_device_properties(index), "uuid", index))

    return [uuid(i) for i in range(torch.cuda.device_count())], uuid(torch.cuda.current_device())


def warn_of_idle_gpus(rank: int, seen: list[tuple[str, list[str], str]]) -> None:
    """On the first rank of each host: a warning when GPUs the host's ranks see are used by none of them (one
    process on a node of 8 GPUs, or tasks given two GPUs each: each trains on one). ``seen``: every rank's
    (host name, UUIDs of the GPUs it sees, UUID of the one it uses), by rank."""
    host = seen[rank][0]
    mine = [s for s in seen if s[0] == host]
    if len(seen) < 2 or seen.index(mine[0]) != rank:
        return
    visible = {u for _, uuids, _ in mine for u in uuids}
    idle = visible - {used for _, _, used in mine}
    if idle:
        warnings.warn(f"{host}: {len(idle)} of the {len(visible)} GPUs its {len(mine)} rank(s) see stay idle (each "
                      "rank trains on one GPU: start one process per GPU, torchrun --nproc_per_node, srun "
                      "--ntasks-per-node, or --gpus-per-task=1)", stacklevel=2)


def init_distributed(dist_cfg: dict, device_pref: str | None = None) -> DistInfo:
    """Initializes the process group when the environment describes several ranks; picks the device."""
    apply_slurm_env()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    index = check_device(device_pref, world)
    use_cuda = uses_cuda(device_pref)
    if use_cuda:
        ndev = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % ndev if index is None else index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = dist_cfg.get("backend") or ("nccl" if use_cuda else "gloo")
    if world > 1 and not dist.is_initialized():
        init_method = dist_cfg.get("init_method")
        kwargs = dict(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
        if init_method:
            kwargs["init_method"] = init_method
        elif "MASTER_PORT" not in os.environ and dist_cfg.get("port", -1) > 0:
            os.environ["MASTER_PORT"] = str(dist_cfg["port"])
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        global _joined_a_group
        _joined_a_group = True
        if use_cuda and index is None:  # (ranks sharing a GPU: NCCL's init stops them, 'Duplicate GPU detected')
            warn_of_idle_gpus(rank, all_gather_object((socket.gethostname(), *gpu_ids())))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device,
                    backend=backend if world > 1 else None)


def cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_after_error() -> None:
    """Destroys the process group, without a barrier, after an error (every rank's, as on_every_rank raises
    them): a process that exits with live gloo connections can end in 'terminate called without an active
    exception' and exit status 1 instead of its own."""
    if dist.is_initialized():
        dist.destroy_process_group()


_launcher_pid: int | None = None  # a spawned rank's launcher, whose death it watches for


def watch_launcher(pid: int) -> None:
    """Called by a rank spawned by ``python -m rmae.train``: ``launcher_gone`` then tells when ``pid`` has died."""
    global _launcher_pid
    _launcher_pid = pid


def watching_launcher() -> bool:
    """Whether this process is a rank spawned by ``python -m rmae.train`` (it watches its launcher)."""
    return _launcher_pid is not None


def launcher_gone() -> bool:
    """Whether this spawned rank's launcher has died (the rank was re-parented). The launcher holds the run folder's
    lock; without it a restart may already be writing there, so the rank must write nothing more."""
    return _launcher_pid is not None and os.getppid() != _launcher_pid


def joined_a_group() -> bool:
    """Whether this process has been a rank of a process group (and should end with ``exit_rank``)."""
    return _joined_a_group


def exit_rank(status: int) -> NoReturn:
    """Ends a rank's process with ``status`` once its work is done (files closed, data workers stopped), without
    the interpreter's finalization. DTensor's caches keep FSDP2's device mesh, and with it the gloo group and its
    worker threads, alive after ``destroy_process_group``; tearing them down during finalization can abort the
    process ('terminate called without an active exception', status 1 instead of the rank's own)."""
    with contextlib.suppress(Exception):
        leave_after_error()  # (a no-op when the group has been destroyed)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


# ------------------------------------------------------------------------------------------------------------
# Collectives that are no-ops on one process
# ------------------------------------------------------------------------------------------------------------
def is_main_rank() -> bool:
    """Whether this process is rank 0 (or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sendable(error: Exception) -> Exception:
    """The exception itself when it survives pickling (one that pickles but cannot be rebuilt - a custom
    __init__ - would fail on every rank), else a RuntimeError with its type, rank and text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__} on rank {dist.get_rank()}: {error}")


def _caught(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """(``fn()``, None), or (None, the exception it raised). KeyboardInterrupt and SystemExit pass: they end the
    process, and the launcher stops the other ranks."""
    try:
        return fn(), None
    except Exception as e:
        return None, e


def on_every_rank(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank (collective): when it raises on any rank, every rank raises the exception of the
    lowest failing rank, so that no rank goes on into a collective the others never reach (NCCL would wait
    there until its timeout). An exception that cannot be pickled travels as a RuntimeError with its text.
    Returns each rank's own result."""
    result, error = _caught(fn)
    if not dist.is_initialized():
        if error is not None:
            raise error
        return result
    gathered = all_gather_object(None if error is None else _sendable(error))
    first = next((rank for rank, e in enumerate(gathered) if e is not None), None)
    if first is not None:
        raise error if first == dist.get_rank() else gathered[first]  # (its own: with its traceback)
    return result


def from_main_rank(fn: Callable[[], T], is_main: bool) -> T:
    """``fn()`` on rank 0 only (collective; ``is_main``: this is rank 0): every rank returns its result or raises
    its exception, so a failed write of rank 0 (a full disk) stops every rank instead of leaving the others
    waiting for it in their next collective. The result must pickle."""
    result, error = _caught(fn) if is_main else (None, None)
    if not dist.is_initialized():
        if error is not None:
            raise error
        return result
    sent_result, sent_error = broadcast_object((result, None if error is None else _sendable(error)))
    if sent_error is not None:
        raise error if is_main else sent_error  # (its own: with its traceback)
    return sent_result


# ------------------------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------------------------
def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """``fully_shard`` every transformer block (every element of every ``nn.ModuleList``), then the root.

    ``param_dtype`` (bf16 / fp16) is FSDP2's compute dtype for the blocks' parameters; the rest (embeddings,
    position tables, tokens, heads: the root's) stay fp32, so that, as on one process under autocast, the residual
    stream between and through the blocks is fp32 (the blocks' LayerNorms compute in fp32; their matmuls run in
    the autocast dtype either way). Gradients are reduced in fp32. Inputs are not cast
    (``cast_forward_inputs=False``): the masking noise must stay fp32 (rounded to bf16 it ties, and argsort then
    keeps other patches than on one process), and autocast chooses compute precision.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # The model returns views (e.g. ``x[:, 1:]``) and never modifies them in place; FSDP2 warns on every call.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    blocks_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    root_mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mp_policy=blocks_mp)
                # methods the model calls besides forward (e.g. Block.forward_split) must gather the shards too
                for name in FORWARD_METHODS:
                    if callable(getattr(block, name, None)):
                        register_fsdp_forward_method(block, name)
    fully_shard(model, mp_policy=root_mp)
    return model


FORWARD_METHODS = ("forward_split",)
