"""R-MAE / MAE / RAE pre-training: ``python -m rmae.train``.

    python -m rmae.train                                   # small demo: tiny R-MAE on bundled photos, CPU ok
    python -m rmae.train --config RMAE/COCO/rmae_fh_4000eps.yaml --model rmae --task pretrain --dataset coco \\
        training.batch_size=4096 training.use_fp16=bfloat16
    torchrun --nproc_per_node=8 -m rmae.train --config ...  # one node or several; srun works the same way

The step: the global batch (``training.batch_size``) is split over ranks and over ``training.iter_per_update``
micro-batches; gradients are accumulated (synchronised only on the last micro-batch) so one update equals one
big-batch step. Masks come from per-step noise drawn for the whole global batch from (seed, step), and data
from a sampler position, so a run resumed from a checkpoint - on any number of ranks - repeats the same steps
(the same samples and masks; the same numbers up to float summation order in float32, while several ranks'
bfloat16 / float16 use FSDP2's low-precision weight copies where one rank keeps float32 weights under autocast).
"""
from __future__ import annotations

# python -m rmae.train, and the ranks it spawns (which load this module as __mp_main__): a Ctrl-C while the
# libraries load exits quietly (rmae.cli)
if __name__ in ("__main__", "__mp_main__"):
    from rmae.cli import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading()

import argparse
import contextlib
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from rmae import checkpoint as ckpt
from rmae import kernels
from rmae import distributed as rdist
from rmae.cores import command_name, cores_per_rank, threads_beside_other_jobs
from rmae.config import (DATASETS, MODELS, TASKS, ConfigError, arch_defaults_comment, built_model_params, canonical_arch,
                         config_identity, dataset_section, formulas_comment, legacy_keys_set, load_config, model_section,
                         schedule_warnings, to_yaml)
from rmae.logging_utils import RunLogger, logger, progress_bar, setup_console
from rmae.recipes import dataset_name

AMP_DTYPES = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------
class WarmupCosine:
    """The original's ``cosine_annealing``: per update t, linear warm-up from ``warmup_factor`` to 1 over
    ``warmup_iterations``, then cosine from the base lr to ``eta_min`` at ``T_max``. The lr of update t is
    ``lr_at(t)`` (t = 0 for the first update, as in the original)."""

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: int, eta_min: float = 0.0, use_warmup: bool = True,
                 warmup_factor: float = 0.0, warmup_iterations: int = 0):
        self.optimizer = optimizer
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        top = max(self.base_lrs) if self.base_lrs else 1.0
        self.eta_mins = [lr / top * eta_min for lr in self.base_lrs]
        self.warmup = warmup_iterations if use_warmup else 0
        self.warmup_factor = warmup_factor
        self.T = max(1, T_max - self.warmup)
        self.last_iter = 0
        self.set(0)

    def factor(self, t: int, i: int = 0) -> float:
        base = self.base_lrs[i]
        if self.warmup > 0 and t <= self.warmup:
            a = t / self.warmup
            return base * (self.warmup_factor * (1.0 - a) + a)
        t = min(t - self.warmup, self.T)
        return self.eta_mins[i] + (base - self.eta_mins[i]) * (1 + math.cos(math.pi * t / self.T)) / 2

    def set(self, t: int) -> None:
        self.last_iter = t
        for i, g in enumerate(self.optimizer.param_groups):
            g["lr"] = self.factor(t, i)

    def step(self) -> None:
        self.set(self.last_iter + 1)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_iter": self.last_iter, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.set(int(state["last_iter"]))


# ----------------------------------------------------------------------------------------------------------------
# Model and optimizer
# ----------------------------------------------------------------------------------------------------------------
def model_kwargs(cfg) -> dict:
    """The model's keyword arguments: ``mae_vit.params`` less the keys left null (the architecture's values)."""
    params = model_section(cfg)["mae_vit"]["params"] or {}  # load_config makes an empty section {}; be safe
    return {k: v for k, v in params.items() if v is not None}


def build_model_from_config(cfg, device: torch.device | str | None = None) -> nn.Module:
    from rmae.models import build_model

    sec = model_section(cfg)
    kwargs = model_kwargs(cfg)
    if cfg["model"] == "mae":
        kwargs.setdefault("num_region", 0)
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        return build_model(sec["mae_vit"]["arch"], variant=cfg["model"], **kwargs)


# ``param_groups``' groups and the switches that exempt each from decay (the original's ``get_mae_parameters``)
GROUP_SWITCHES = {"decay": (), "norm": ("wd_norm",), "bias": ("wd_bias",), "norm_bias": ("wd_norm", "wd_bias")}


def group_weight_decay(group: str, weight_decay: float, wd_norm: float, wd_bias: float) -> float:
    """The decay of one of ``param_groups``' groups, by the original's rule (``get_mae_parameters``):
    ``wd_norm`` and ``wd_bias`` are switches, 0 exempts norm-layer parameters / biases from decay and any other
    value leaves them at ``weight_decay``; a norm layer's bias is exempt when either switch is 0."""
    switches = {"wd_norm": wd_norm, "wd_bias": wd_bias}
    return 0.0 if any(switches[key] == 0 for key in GROUP_SWITCHES[group]) else weight_decay


def param_groups(model: nn.Module, weight_decay: float, wd_norm: float, wd_bias: float) -> list[dict]:
    """Four groups, the same for any setting (so a resumed run may change them): weights, norm-layer weights,
    other biases, norm-layer biases; each with ``group_weight_decay``."""
    norm_params = set()
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
            norm_params.update(id(p) for p in m.parameters(recurse=False))
    members: dict[str, list] = {group: [] for group in GROUP_SWITCHES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = id(p) in norm_params
        if "bias" in name.rsplit(".", 1)[-1]:  # (the original tests the name inside its module)
            members["norm_bias" if is_norm else "bias"].append(p)
        else:
            members["norm" if is_norm else "decay"].append(p)
    return [{"params": ps, "weight_decay": group_weight_decay(name, weight_decay, wd_norm, wd_bias), "name": name}
            for name, ps in members.items() if ps]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    p = cfg["optimizer"]["params"]
    groups = param_groups(model, p["weight_decay"], p["wd_norm"], p["wd_bias"])
    fused = None
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        fused = True
    return torch.optim.AdamW(groups, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                             weight_decay=p["weight_decay"], fused=fused)


def apply_optimizer_settings(cfg, optimizer: torch.optim.Optimizer, base_lrs: list[float],
                             group_names: list[str]) -> list[str]:
    """After loading a checkpoint's optimizer state (which carries the hyperparameters it was saved with, names
    included: a checkpoint of three groups gives its names to the four of today): the configured weight decays,
    betas, eps and base lr again, with ``group_names`` as ``param_groups`` made them, so that the run trains with
    what config.yaml records. Returns the settings that differed, as ``"optimizer.params.<key>: then -> now"``."""
    p = cfg["optimizer"]["params"]
    changed: dict[str, str] = {}
    for g, base_lr, name in zip(optimizer.param_groups, base_lrs, group_names):
        g["name"] = name
        decay = group_weight_decay(name, p["weight_decay"], p["wd_norm"], p["wd_bias"])
        keys = ", ".join(GROUP_SWITCHES[name]) or "weight_decay"
        wanted = {f"weight decay of the {name} group ({keys})": ("weight_decay", decay),
                  "betas": ("betas", tuple(p["betas"])), "eps": ("eps", p["eps"]), "lr": ("initial_lr", base_lr)}
        for key, (group_key, now) in wanted.items():
            then = g.get(group_key)
            then = tuple(then) if isinstance(then, (list, tuple)) else then
            if then is not None and then != now:  # (None: a group the checkpoint did not have)
                label = key if key.startswith("weight decay") else f"optimizer.params.{key}"
                changed.setdefault(key, f"{label}: {then!r} -> {now!r}")
            g[group_key] = now
    return list(changed.values())


def build_scheduler(cfg, optimizer) -> WarmupCosine:
    s = cfg["scheduler"]["params"]
    return WarmupCosine(optimizer, T_max=s["T_max"], eta_min=s["eta_min"], use_warmup=s["use_warmup"],
                        warmup_factor=s["warmup_factor"], warmup_iterations=s["warmup_iterations"])


# ----------------------------------------------------------------------------------------------------------------
# Masking noise: one [global_batch, N] table per (seed, step, micro-batch), sliced per rank
# ----------------------------------------------------------------------------------------------------------------
def step_noise(seed: int, step: int, rows: int, num_patches: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + 0x5EED)
    return torch.rand(rows, num_patches, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def data_folders(cfg) -> dict:
    """Where the training images are, as DataConfig fields: ``split`` when set (that split's standard folders),
    else the original's ``imdb_files.train``: ``image_folder``, with ``mask_folder`` and ``anno_file`` paired
    with it one to one (null: ``fh_<name>`` beside each image folder, and each folder's listing)."""
    ds = dataset_section(cfg)
    if ds["split"]:
        return {"split": ds["split"]}
    train = ds["imdb_files"]["train"]
    if train["image_folder"] is None:
        return {}
    where = f"dataset_config.{cfg['dataset']}_pretrain.imdb_files.train"
    if cfg["dataset"] == "sample":
        raise ConfigError(f"{where}.image_folder is set, but the sample set has no folders; "
                          "use --dataset coco or imnet")
    folders = {key: None if value is None else [value] if isinstance(value, str) else list(value)
               for key, value in train.items()}
    count = len(folders["image_folder"])
    for key in ("mask_folder", "anno_file"):
        if folders[key] is not None and len(folders[key]) != count:
            raise ConfigError(f"{where}.{key} has {len(folders[key])} entries but {where}.image_folder has {count}: "
                              f"they pair up one to one (or set {key} to null for the defaults)")
    return folders


def region_source(cfg, num_region: int) -> str:
    """Where the loader takes each sample's regions from: ``region_source``; none for a model without regions.
    A model with regions under a recipe without them (an MAE recipe with --model rmae or rae) reads the FH
    masks (offline), as the R-MAE recipes do, so that every recipe runs with any --model."""
    source = dataset_section(cfg)["region_source"]
    if num_region == 0:
        return "none"
    return "offline" if source == "none" else source


def data_loader(cfg, dinfo: rdist.DistInfo, micro_batch: int, start: int, model: nn.Module):
    """This rank's endless DataLoader of micro-batches, resuming after ``start`` per-rank samples.

    The sampler gives rank r the global draws r, r + W, ... and seeds each sample's augmentation by its draw,
    so the samples of an update do not depend on the number of ranks. With the original's
    ``region_sample_type: random_fg`` the loader also draws each sample's masking permutation (its
    ``noise``), so regions can be sampled among the labels of the visible patches."""
    from rmae.data import DataConfig, build_loader

    ds = dataset_section(cfg)
    tr = cfg["training"]
    dc = DataConfig(dataset=cfg["dataset"], **data_folders(cfg), root=ds["data_dir"],
                    regions=region_source(cfg, model.num_region), train=True,
                    img_size=model.img_size, num_regions=model.num_region, sampler=ds["sampler"],
                    cache_bytes=ds["cache_bytes"],
                    label_resize=ds["label_resize"], min_region_patches=2 if ds["filter_small_patches"] else 0,
                    patch_size=model.patch_size, scale=tuple(ds["crop_scale"]), ratio=tuple(ds["crop_ratio"]),
                    region_sample=model.region_sample_type, region_mask_ratio=model.region_mask_ratio)
    with in_config_terms(cfg):
        return build_loader(dc, batch_size=micro_batch, num_workers=tr["num_workers"], rank=dinfo.rank,
                            world_size=dinfo.world_size, seed=tr["seed"], start=start,
                            pin_memory=tr["pin_memory"] and dinfo.device.type == "cuda")


@contextlib.contextmanager
def in_config_terms(cfg):
    """Errors raised inside, in the config's terms (``in_config_terms_error``)."""
    try:
        yield
    except (FileNotFoundError, DataError) as e:
        translated = in_config_terms_error(cfg, e)
        if translated is None:
            raise
        raise translated from e


def in_config_terms_error(cfg, error: BaseException) -> BaseException | None:
    """The data library's hints for a missing dataset, mask folder or mask name its arguments (``root=``,
    ``regions='offline'``): the same error naming the config keys that set them, or None (nothing to change)."""
    if not isinstance(error, (FileNotFoundError, DataError)):
        return None
    key = f"dataset_config.{cfg['dataset']}_pretrain"
    message = str(error).replace("root= to change it", f"{key}.data_dir to change it")
    split = f"{key}.split=null " if dataset_section(cfg).get("split") else ""  # (a split overrides imdb_files)
    message = message.replace(" with image_folder=[", f" with {split}{key}.imdb_files.train.image_folder=[")
    message = message.replace("] mask_folder=[", f"] {key}.imdb_files.train.mask_folder=[")
    message = message.replace("(mask_folder names", f"({key}.imdb_files.train.mask_folder names")
    message = message.replace("(anno_file: ", f"({key}.imdb_files.train.anno_file: ")
    message = message.replace("; null lists the folder", f"; {key}.imdb_files.train.anno_file=null lists the folder")
    # regions='online' (...) or 'online_crop' -> <key>.region_source=online (...) or online_crop
    if "regions='" in message:
        message = re.sub(r"regions='(\w+)'", rf"{key}.region_source=\1", message)
        message = re.sub(r"'(offline|online|online_crop|none)'", r"\1", message)
    if message == str(error):
        return None
    try:
        return type(error)(message)
    except TypeError:  # an error class with other constructor arguments
        return FileNotFoundError(message)


class TrainingDiverged(RuntimeError):
    """``training.max_skips_in_a_row`` updates in a row with a non-finite loss or gradient."""


class LauncherGone(KeyboardInterrupt):
    """The launcher of the spawned ranks died (SIGKILL, an OOM kill), and with it the run folder's lock. Raised like
    a second Ctrl-C (at once, out of any code, past ``except Exception``), but the rank writes nothing more."""


LAUNCHER_GONE = ("the launcher of the spawned ranks died, and with it the run folder's lock: stopping without a "
                 "checkpoint of this update, so as not to race a restarted run; run the same command again to continue "
                 "from the last checkpoint")


def stop_if_launcher_gone() -> None:
    """LauncherGone on every rank (collective) when the launcher of spawned ranks has died: a checkpoint written now
    could race a restarted run (the lock went with the launcher), so the ranks stop without writing anything more."""
    if rdist.watching_launcher() and any(rdist.all_gather_object(rdist.launcher_gone())):
        raise LauncherGone(LAUNCHER_GONE)


class DataError(Exception):
    """Training data that cannot be used (a mask made from another image, ...); the message names the files."""


@contextlib.contextmanager
def data_error_context():
    """A ValueError or FileNotFoundError of the data pipeline becomes a DataError with the pipeline's message
    (from a loader worker, without the worker's traceback that the loader adds to it)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a worker: its last line is "<Type>: <message>"
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        raise DataError(message) from e


def next_batch(it) -> dict:
    """The next micro-batch (data errors as DataError)."""
    with data_error_context():
        return next(it)


def picture_batch(dataset, count: int = 4) -> tuple[torch.Tensor, dict]:
    """The samples the pictures show (``vis/``): the dataset's first ``count`` images, image i with the
    augmentation of draw i, so every start, resume and rank count pictures the same crops."""
    from torch.utils.data import default_collate

    with data_error_context():
        batch = default_collate([dataset[(i, i)] for i in range(min(count, len(dataset)))])
    # (with region_sample_type=random_fg also the samples' "noise": the mask their regions were drawn for)
    return batch["image"], {k: v for k, v in batch.items() if k.startswith("region_") or k == "noise"}


def to_device(batch: dict, device: torch.device, num_region: int):
    from rmae.models import RegionLabels

    nb = device.type == "cuda"
    images = batch["image"].to(device, non_blocking=nb)
    regions = None
    if num_region > 0:
        regions = RegionLabels(batch["region_labels"].to(device, non_blocking=nb),
                               batch["region_scale"].to(device, non_blocking=nb),
                               batch["region_id"].to(device, non_blocking=nb))
    return images, regions


# ----------------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------------
def console_warnings(other):
    """A ``warnings.formatwarning`` that writes the data pipeline's warnings (``rmae.data``) as the console log
    writes its lines (they read ``rmae.data:0: RuntimeWarning: ...``) and any other warning with ``other``."""
    def format_warning(message, category, filename, lineno, line=None) -> str:
        if filename != "rmae.data":
            return other(message, category, filename, lineno, line)
        return f"{time.strftime('%H:%M:%S')} WARNING {message}\n"

    format_warning.data_lines = True
    return format_warning


class QuietWorkerInit:
    """A DataLoader worker_init_fn that makes the worker ignore SIGTERM / SIGUSR1 / SIGINT (PyTorch installs a
    dying SIGTERM handler in workers), then runs the pipeline's own init. Slurm and terminals signal the whole
    process group; the main process then finishes the update and checkpoints while the workers keep serving.
    Workers still exit when the loader shuts down or the main process dies."""

    def __init__(self, fn=None):
        self.fn = fn

    def __call__(self, worker_id: int) -> None:
        for s in StopFlag.SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if not getattr(warnings.formatwarning, "data_lines", False):  # (a forked worker has the main process's)
            warnings.formatwarning = console_warnings(warnings.formatwarning)  # "skipping sample": as log lines
        if self.fn is not None:
            self.fn(worker_id)


class StopFlag:
    """SIGTERM / SIGUSR1 / SIGINT set a flag; the loop checkpoints at the end of the current update and exits."""

    def __init__(self, announce: bool = True):
        self.signal = None
        self.announce = announce  # one rank says what a Ctrl-C does (a terminal's reaches every rank)
        self._old = {}

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def install(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except (ValueError, OSError):  # not the main thread
                pass
        return self

    _holding = False  # a checkpoint is being written: a second Ctrl-C waits for it (``holding``)
    _held = False

    @contextlib.contextmanager
    def holding(self):
        """A second Ctrl-C while inside stops at the end of the block, not in it: torch's archive writer turns the
        KeyboardInterrupt into a RuntimeError (a traceback and exit 1 where a message and 130 were meant)."""
        self._holding, self._held = True, False
        try:
            yield
        finally:
            self._holding = False
        if self._held:
            raise KeyboardInterrupt

    def _handle(self, signum, frame):
        if rdist.launcher_gone():  # PyTorch's parent-death signal (SIGINT, once per thread the launcher had): every
            # rank raises LauncherGone together at the end of the update (the loop's flags), so none waits in a
            # collective for one that left; a checkpoint begun under the lock is finished, none is begun
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the next ones)
            return
        if self.signal is not None and signum == signal.SIGINT:
            if self._holding:
                self._held = True
                return
            raise KeyboardInterrupt
        self.signal = signum
        if signum == signal.SIGINT and self.announce:
            logger.warning("stopping after this update (a checkpoint is saved); a second Ctrl-C stops at once, "
                           "without one")

    def restore(self):
        for s, h in self._old.items():
            if s == signal.SIGINT and rdist.launcher_gone():  # (ignored: more parent-death signals may come)
                continue
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, h)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def run_dir_of(cfg) -> Path:
    tr = cfg["training"]
    if tr["save_dir"]:
        return Path(tr["save_dir"])
    name = tr["experiment_name"] or f"{cfg['model']}_{cfg['dataset']}_{Path(str(cfg['config'] or 'run')).stem}"
    return Path("runs") / name


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


DATA_BOUND_SHARE = 0.2  # of an update's time spent waiting for the loader, in a log window after the first


def data_bound_warning(data_time: float, step_time: float, num_workers: int, cores: int,
                       source: str) -> str | None:
    """The warning for a GPU rank that waits for its loader (seconds per update, in one log window: the wait for
    each update's first micro-batch, which the GPU surely shares), or None.
    ``source``: where the regions come from (``region_source``). On the CPU the loader's workers and the
    training share the cores, so more workers is no remedy there."""
    if step_time <= 0 or data_time <= DATA_BOUND_SHARE * step_time:
        return None
    remedy = (f"raise training.num_workers (now {num_workers}; this rank may use {cores} cores, so up to about "
              f"{max(1, cores - 1)} workers)" if num_workers < cores - 1 else
              f"training.num_workers ({num_workers}) already uses this rank's {cores} cores: give the ranks more "
              "cores (srun --cpus-per-task)")
    online = ("; offline FH masks (python -m rmae.preprocess, region_source=offline) cost a worker far less "
              "than FH computed while loading") if source.startswith("online") else ""
    return (f"the GPU waits for data {data_time:.3g} s of each {step_time:.3g} s update "
            f"({100 * data_time / step_time:.0f}%): {remedy}{online}")


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (DTensor shards reduced across ranks), float32."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return total.float()


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def back_off(scaler: torch.amp.GradScaler) -> None:
    """After a skipped step, what ``GradScaler.update()`` does when it found an overflow: scale times
    ``backoff_factor``, growth tracker back to 0. The loop decides the skip itself (on every rank alike: loss
    or global gradient norm not finite), so it sets that state rather than relying on the scaler's own check
    of this rank's gradient shards."""
    if not scaler.is_enabled():
        return
    state = scaler.state_dict()
    state.update(scale=state["scale"] * state["backoff_factor"], _growth_tracker=0)
    scaler.update(state["scale"])  # ends the iteration (clears the unscale_ record)
    scaler.load_state_dict(state)


# Files of a run besides its checkpoints, moved with them by ckpt.set_aside
RUN_FILES = ("log.jsonl", "config.yaml", "encoder.safetensors", "vis", "tensorboard")


def check_launch(cfg, world: int) -> None:
    """Settings that fit together only on some machines or rank counts, checked before any rank starts: a
    ConfigError naming the keys."""
    tr, cuda = cfg["training"], rdist.uses_cuda(cfg["training"]["device"])
    G, A = tr["batch_size"], tr["iter_per_update"]
    errors = []
    if G % (A * world):
        errors.append(f"training.batch_size ({G}) must be divisible by training.iter_per_update x ranks ({A} x "
                      f"{world}): each rank's micro-batches are batch_size / (iter_per_update x ranks)")
    if world > 1 and cfg["distributed"]["backend"] == "nccl" and not cuda:
        errors.append(f"distributed.backend=nccl needs CUDA devices; these {world} ranks run on the CPU: use gloo "
                      "(or leave it null: nccl on GPUs, gloo on the CPU)")
    impl = model_section(cfg)["mae_vit"]["params"].get("kernel_impl")
    if impl == "triton" and not cuda and not kernels.interpreting():
        errors.append(f"model_config.{cfg['model']}.mae_vit.params.kernel_impl=triton needs a CUDA device (on the CPU only Triton's interpreter runs its kernels, "
                      "with TRITON_INTERPRET=1, for tests): use auto (Triton on GPUs, PyTorch elsewhere) or reference")
    if errors:
        raise ConfigError("\n".join(errors))


def rank_start(position: int, world: int) -> int:
    """Each rank's sampler start for a global data position: the samples drawn so far, split over the ranks and
    rounded up. A checkpoint of another batch size and rank count can hold a position that is no multiple of the
    ranks (6 after one update of 6 on one rank, continued on 4 ranks): the fewer than ``world`` draws up to the
    next multiple are skipped, never a drawn sample (with its augmentation) trained on twice. The trainer continues
    from the rounded position (``rank_start * world``), so later checkpoints count the skipped draws as drawn."""
    return -(-position // world)


def later_run_files(run_dir: Path, step: int) -> list[Path]:
    """What a history after ``step`` wrote besides its checkpoints and log records: its pictures, and the encoder
    when that history finished (its ``done`` record, after ``step``: an interrupted or killed later history wrote
    checkpoints but no encoder, and the one there is the kept history's)."""
    pictures = [p for p in sorted((run_dir / "vis").glob("step_*.png"))
                if p.stem[5:].isdigit() and int(p.stem[5:]) > step]
    finished_later = any(r.get("event") == "done" and isinstance(r.get("step"), int) and r["step"] > step
                         for r in ckpt.log_records(run_dir / "log.jsonl"))
    return pictures + ([run_dir / "encoder.safetensors"] if finished_later else [])


def history_step(run_dir: Path, resume_from: Path | None, meta: dict | None) -> int | None:
    """The last step of the history the run continues in ``run_dir``: the resumed step when its checkpoint is
    one of the folder's own (later ones belong to another history), else None (none of the folder's files do)."""
    if meta is None or resume_from.resolve().parent != ckpt.checkpoint_dir(run_dir).resolve():
        return None
    return int(meta["step"])


def model_settings(c: dict) -> dict:
    """``model`` and ``model_config.<model>`` (dotted keys below it) as the model is built: a parameter left null
    as the architecture's value, the original's MAE names of an architecture as ours (``mae_base_patch16`` is
    ``rmae_base_patch16``), less the kernel choice (the same model)."""
    out, todo = {"model": c["model"]}, [("", model_section(c))]
    while todo:
        prefix, d = todo.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                todo.append((f"{prefix}{k}.", v))
            else:
                out[f"{prefix}{k}"] = v
    out.pop("mae_vit.params.kernel_impl", None)
    arch = out.get("mae_vit.arch")
    if isinstance(arch, str):
        out["mae_vit.arch"] = canonical_arch(arch)
        with contextlib.suppress(KeyError):  # not an architecture (refused when the config is checked)
            for key, value in built_model_params(c).items():
                if f"mae_vit.params.{key}" in out:
                    out[f"mae_vit.params.{key}"] = value
    return out


def check_model_config(cfg, meta: dict, path: Path) -> None:
    """ConfigError naming the settings that differ when the checkpoint's model is not the configured one."""
    from omegaconf import OmegaConf

    if not meta.get("config"):
        return
    then = model_settings(OmegaConf.to_container(OmegaConf.create(meta["config"]), resolve=True))
    now = model_settings(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    section = f"model_config.{now['model'] if now['model'] == then['model'] else '<model>'}."
    diff = [f"{'' if k == 'model' else section}{k}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(set(now) | set(then), key=lambda k: (k != "model", k)) if now.get(k) != then.get(k)]
    if diff:
        raise ConfigError(f"checkpoint {path} is of another model:\n  " + "\n  ".join(diff) + "\nto start a new "
                          "run instead, use another training.save_dir, or training.resume=false (and no "
                          "training.resume_file): the earlier run's files then move to previous/ in the run folder")


def check_same_experiment(cfg, meta: dict, path: Path, run_dir: Path) -> None:
    """In the default run folder (no save_dir, no experiment_name), which only the config file's stem names: a
    ConfigError when the checkpoint there was made with another config file of the same stem (``a/exp.yaml`` and
    ``b/exp.yaml``), instead of silently continuing the other experiment."""
    from omegaconf import OmegaConf

    tr = cfg["training"]
    if tr["save_dir"] or tr["experiment_name"] or not meta.get("config"):
        return
    # recorded when the checkpoint was saved (the install then present); checkpoints before that: from the path
    saved = OmegaConf.to_container(OmegaConf.create(meta["config"]), resolve=False)
    then = meta.get("config_identity") or config_identity(saved.get("config"), moved_install=True)
    now = config_identity(cfg["config"])
    if then is not None and now is not None and then != now:
        raise ConfigError(f"the run folder {run_dir} holds a run of another config file: checkpoint {path} was made "
                          f"with {then}, this run uses {now}.\nGive this run its own folder (training.save_dir or "
                          f"training.experiment_name), or set training.save_dir={run_dir} to continue that run "
                          "with this config")
    changed = "\n  ".join(data_changes(saved, cfg, meta.get("data_root")))
    if changed:
        raise ConfigError(f"the run folder {run_dir} holds a run on other data: checkpoint {path} was made with\n  "
                          f"{changed}\nGive this run its own folder (training.save_dir or training.experiment_name), "
                          f"or set training.save_dir={run_dir} to continue that run on this data")


RUN_SETTINGS = ("training.max_update", "training.batch_size", "training.iter_per_update", "training.use_fp16",
                "training.seed", "scheduler.params.T_max", "scheduler.params.warmup_iterations",
                "scheduler.params.eta_min", "scheduler.params.use_warmup", "scheduler.params.warmup_factor")


def run_settings_changed(meta: dict, cfg) -> list[str]:
    """The length, batch, precision, seed, schedule and data settings that differ from the checkpoint's saved
    config (allowed, e.g. a run extended with training.max_update, but said: the lr schedule, the data per update,
    the data order, crops and masks, or the images themselves change from there on)."""
    from omegaconf import OmegaConf

    if not meta.get("config"):
        return []
    saved = OmegaConf.create(meta["config"])
    out = []
    for key in RUN_SETTINGS:
        then, now = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        if then is not None and then != now:
            out.append(f"{key}: {then} in the checkpoint, {now} now")
    # other training images (in a folder named by save_dir / experiment_name; the default folder refuses them)
    return out + data_changes(OmegaConf.to_container(saved, resolve=False), cfg, meta.get("data_root"))


def data_changes(saved: dict, cfg, saved_root: str | None = None) -> list[str]:
    """The settings choosing the training images (``data_settings``) that differ between a checkpoint's saved
    config (a plain tree) and ``cfg``, one line each. ``saved_root``: the datasets root the checkpoint's run
    resolved (``data_root``; checkpoints before it was stored: None), compared instead of ``data_dir``, so that
    $E2E_DATASETS counts and a data_dir naming the same folder does not."""
    from omegaconf import OmegaConf

    then, now = data_settings(saved), data_settings(OmegaConf.to_container(cfg, resolve=True))
    if None in (then, now):
        return []
    key = f"dataset_config.{cfg['dataset']}_pretrain.data_dir"
    names = {}
    if then.get("dataset") == now.get("dataset") and not (root_chooses_images(then) or root_chooses_images(now)):
        then[key] = now[key] = None  # every folder absolute: the root chooses nothing
    elif saved_root is not None and then.get("dataset") == now.get("dataset"):
        then[key], now[key] = saved_root, data_root(cfg)
        names[key] = "datasets root (data_dir, else $E2E_DATASETS)"
    return [f"{names.get(k, k)}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]


def root_chooses_images(settings: dict) -> bool:
    """Whether the datasets root decides which files a run reads (``data_settings``): a split, the default
    folders, or a relative image / mask folder or annotation file (taken under the root)."""
    prefix = f"dataset_config.{settings['dataset']}_pretrain."
    if settings.get(prefix + "split") or settings.get(prefix + "imdb_files.train.image_folder") is None:
        return True
    paths = []
    for k in ("image_folder", "mask_folder", "anno_file"):
        value = settings.get(prefix + "imdb_files.train." + k)
        paths += [] if value is None else [value] if isinstance(value, str) else list(value)
    return any(not os.path.isabs(os.path.expanduser(str(p))) for p in paths)


def data_root(cfg) -> str | None:
    """The datasets root the run reads (data_dir, else $E2E_DATASETS, else .data; absolute), None for the bundled
    sample set, which has none."""
    from rmae.recipes import dataset_root

    if cfg["dataset"] == "sample":
        return None
    return str(dataset_root(dataset_section(cfg)["data_dir"]).resolve())


def data_settings(c: dict) -> dict | None:
    """What chooses the training images (a plain config tree): the dataset, its root, split and folders (None:
    not in this config)."""
    try:
        ds = c["dataset_config"][f"{c['dataset']}_pretrain"]
        train_files = ds["imdb_files"]["train"]
        out = {"dataset": c["dataset"], f"dataset_config.{c['dataset']}_pretrain.data_dir": ds.get("data_dir"),
               f"dataset_config.{c['dataset']}_pretrain.split": ds.get("split")}
        for k in ("image_folder", "mask_folder", "anno_file"):
            out[f"dataset_config.{c['dataset']}_pretrain.imdb_files.train.{k}"] = (train_files or {}).get(k)
        return out
    except (KeyError, TypeError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def train(cfg, require_resume: bool = False) -> dict:
    """Runs (or continues) the run described by ``cfg``; returns a summary (run_dir, step, last losses)."""
    tr = cfg["training"]
    dinfo = rdist.init_distributed(cfg["distributed"], tr["device"])
    setup_console(dinfo.is_main)
    device = dinfo.device
    run_dir = run_dir_of(cfg)
    world, rank = dinfo.world_size, dinfo.rank
    G, A = tr["batch_size"], tr["iter_per_update"]
    check_launch(cfg, world)  # (also here: train() is called without main(), by the spawned ranks and by tests)
    b = G // (A * world)  # per-rank micro-batch
    amp_dtype = AMP_DTYPES[tr["use_fp16"]]
    random_seed = tr["seed"] in (None, -1)  # the original's "random seed": drawn once, then recorded
    if random_seed:
        tr["seed"] = rdist.from_main_rank(lambda: int.from_bytes(os.urandom(4), "little"), dinfo.is_main)
    use_compile = tr["use_compile"] if tr["use_compile"] is not None else device.type == "cuda"
    sec = model_section(cfg)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (use_fp16=none), as timm/MAE run
    # warnings about the settings on this machine, logged (and recorded in log.jsonl) once the run has its log
    machine_warnings = []
    if device.type != "cuda" and amp_dtype is torch.float16:  # (bfloat16 on a CPU: within 1.2x of float32)
        machine_warnings.append("training.use_fp16=float16 on the CPU: PyTorch's CPU float16 kernels are slow (the "
                                "demo's updates take about 10x as long as in float32); use training.use_fp16=bfloat16 "
                                "or none there")

    # Model: the same initial weights on every rank (seeded), then per-rank RNG streams.
    ckpt.seed_everything(tr["seed"])
    model = build_model_from_config(cfg, device)
    raw = model
    num_region = raw.num_region
    num_patches = raw.num_patches
    img_size = raw.img_size
    if world > 1:
        rdist.shard_model(model, param_dtype=amp_dtype)
    ckpt.seed_everything(tr["seed"] + rank)
    optimizer = build_optimizer(cfg, model)
    group_names = [g["name"] for g in optimizer.param_groups]  # (a checkpoint's state brings its own names)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]

    step, position, skipped = 0, 0, 0
    errors_before = 0  # unreadable samples skipped before the resumed checkpoint (all ranks)
    resume_from, meta, unreadable = None, None, []
    if tr["resume_file"]:
        resume_from = Path(tr["resume_file"])
        # an explicit file that cannot be read: an error, no fallback
        meta = ckpt.read_on_all_ranks(resume_from, what="training.resume_file")
    elif tr["resume"]:
        resume_from, meta, unreadable = ckpt.read_latest(run_dir, dinfo.is_main)
    if require_resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.checkpoint_dir(run_dir)}")
    if random_seed and meta is not None and meta.get("config"):  # a resumed run keeps the seed it drew
        from omegaconf import OmegaConf

        saved_seed = OmegaConf.select(OmegaConf.create(meta["config"]), "training.seed")
        if isinstance(saved_seed, int) and saved_seed >= 0:
            tr["seed"] = saved_seed
    if random_seed and dinfo.is_main:
        logger.info("training.seed=-1 (random): this run's seed is %d (recorded in config.yaml and the checkpoints; "
                    "training.seed=%d repeats it)", tr["seed"], tr["seed"])
    if meta is not None:  # (on every rank alike: paths are resolved in each rank's own working directory)
        rdist.on_every_rank(lambda: check_model_config(cfg, meta, resume_from))
        if not tr["resume_file"]:
            rdist.on_every_rank(lambda: check_same_experiment(cfg, meta, resume_from, run_dir))

    def set_aside_later_history() -> Path | None:
        """(Rank 0) moves what does not belong to the history this run continues; returns where to."""
        kept_step = history_step(run_dir, resume_from, meta)
        moved = ckpt.set_aside(run_dir, RUN_FILES, keep_up_to=kept_step, later_files=later_run_files)
        tail = None if moved is None else moved / f"log.after_step_{kept_step}.jsonl"
        if moved is not None and os.listdir(moved) == [tail.name]:
            logger.warning("continuing from %s: the log's records after it (a run that stopped without a checkpoint "
                           "of its last steps) were moved to %s", resume_from, tail)
        elif moved is not None and kept_step is not None:
            logger.warning("continuing from %s: what the run folder held after step %d (%s) was moved to %s, so "
                           "log.jsonl holds one history", resume_from, kept_step, ", ".join(sorted(os.listdir(moved))),
                           moved)
        elif moved is not None:
            logger.warning("%s: the earlier run's files in %s (%s) were moved to %s, so the two runs do not mix",
                           "starting over" if meta is None else f"continuing from {resume_from}", run_dir,
                           ", ".join(sorted(os.listdir(moved))), moved)
        if moved is not None and kept_step is not None and (run_dir / "config.yaml").is_file():
            # the later history's settings (config.yaml is rewritten below)
            shutil.copy2(run_dir / "config.yaml", moved / "config.yaml")
        return moved

    moved = rdist.from_main_rank(set_aside_later_history, dinfo.is_main)  # (a failure: every rank's error)
    log = RunLogger(run_dir, dinfo.is_main, tr["tensorboard"], tr["tensorboard_logdir"],
                    purge_step=None if meta is None else int(meta["step"]) + 1)
    stop = StopFlag(announce=dinfo.is_main)
    formatwarning = warnings.formatwarning  # (restored at the end)
    warnings.formatwarning = console_warnings(formatwarning)
    console = contextlib.ExitStack()
    bar = None
    try:  # from here on, a failure is the log's last event (not a 'start' that seems to hang)
        # a signal from here on stops the run after its first update (it was lost while the workers started)
        stop.install()
        if moved is not None:
            log.log({"event": "moved_earlier_run", "to": str(moved)}, console=False)  # (the warning above)
        if meta is not None:
            meta = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, rank=rank, payload=meta)
            step, position = int(meta["step"]), int(meta["data_position"])
            skipped = int(meta.get("skipped", 0))  # checkpoints before it was stored: 0
            errors_before = int(meta.get("data_errors", 0))
            changed = apply_optimizer_settings(cfg, optimizer, scheduler.base_lrs, group_names)
            scheduler.load_state_dict(meta["scheduler"])
            run_changes = run_settings_changed(meta, cfg)
            if changed and dinfo.is_main:
                warn_and_record(log, "optimizer_settings_changed", "optimizer settings differ from the checkpoint's; "
                                "training on with the configured ones:\n  " + "\n  ".join(changed), changed=changed)
            if run_changes and dinfo.is_main:
                warn_and_record(log, "run_settings_changed", "run settings differ from the checkpoint's; training "
                                "on with the configured ones:\n  " + "\n  ".join(run_changes), changed=run_changes)
            if meta.get("scaler"):
                scaler.load_state_dict(meta["scaler"])
            ckpt.restore_rng(meta, rank, world, tr["seed"])
            if meta.get("world_size") != world and dataset_section(cfg)["sampler"] == "shard" and dinfo.is_main:
                logger.warning("sampler=shard with %s ranks instead of %s: each rank's shard changes, so the data "
                               "order differs from an uninterrupted run", world, meta.get("world_size"))
            log.event("resume", step=step, file=str(resume_from), from_world_size=meta.get("world_size"),
                      world_size=world, **({"unreadable": unreadable} if unreadable else {}))
            if step >= tr["max_update"] and dinfo.is_main:
                logger.info("the run is already at step %d of training.max_update=%d: nothing to train (the "
                            "pictures and encoder.safetensors are written again); raise training.max_update to "
                            "train on, or set training.resume=false to start afresh", step, tr["max_update"])
        if step < tr["max_update"]:  # (a finished run's folder keeps the settings it was trained with)
            rdist.from_main_rank(lambda: (run_dir / "config.yaml").write_text(to_yaml(cfg)), dinfo.is_main)
        if dinfo.is_main:
            for k in legacy_keys_set(cfg):
                logger.warning("config key %s is accepted for compatibility with the original but has no effect", k)
            for message in schedule_warnings(cfg) + machine_warnings:
                warn_and_record(log, "config_warning", message, message=message)
        if use_compile:
            # in place: state_dict keys stay clean (no _orig_mod.). Static shapes: a sharded model compiles per block,
            # and one Block.forward serves the encoder, the pixel decoder and the region decoder (three widths);
            # automatic dynamic shapes would make that frame one generic graph for all three
            model.compile(dynamic=False)
            if dinfo.is_main and step < tr["max_update"]:
                logger.info("torch.compile: the first update compiles the model (about a minute for the demo on a "
                            "CPU, minutes for ViT-L on a GPU); training.use_compile=false runs eagerly")

        max_update = tr["max_update"]
        nparams = sum(p.numel() for p in raw.parameters())
        if dinfo.is_main and step == 0:
            log.event("start", model=cfg["model"], arch=sec["mae_vit"]["arch"], params=nparams, world_size=world,
                      device=str(device), batch_size=G, micro_batch=b, iter_per_update=A, amp=tr["use_fp16"],
                      compile=use_compile, img_size=img_size, num_region=num_region, run_dir=str(run_dir),
                      threads=torch.get_num_threads())

        source = region_source(cfg, num_region)
        if num_region > 0 and source != dataset_section(cfg)["region_source"]:  # an MAE recipe with --model rmae or rae
            key = f"dataset_config.{cfg['dataset']}_pretrain.region_source"
            log.event("region_source", source=source,
                      message=f"{key} is none but model {cfg['model']} has {num_region} regions: reading the FH "
                              f"masks (offline), as the R-MAE recipes do; set {key} to offline, online or "
                              f"online_crop to choose (none gives no regions, which model {cfg['model']} needs)")
        with warnings.catch_warnings(record=True) as data_warnings:  # a mask folder of other FH parameters, ...
            warnings.simplefilter("always")
            loader = data_loader(cfg, dinfo, b, rank_start(position, world), raw)
        position = rank_start(position, world) * world  # (the draws skipped stay skipped in later checkpoints)
        for warning in data_warnings if dinfo.is_main else ():
            warn_and_record(log, "data_warning", str(warning.message), message=str(warning.message))
        cache = getattr(loader.dataset, "cache", None)
        if cache is not None:  # sampler=shard: each rank's encoded images (and masks) in memory
            caches = [dict(rank=rank, items=cache.items, of=cache.total_items, mib=cache.nbytes / 2**20,
                           limit_mib=cache.limit_bytes / 2**20)]
            if world > 1:
                gathered = [None] * world
                torch.distributed.all_gather_object(gathered, caches[0])
                caches = gathered
            for fields in caches:
                log.event("shard_cache", **fields)
        vis_batch = picture_batch(loader.dataset)  # every rank: the pictures' forward is collective
        if getattr(loader, "num_workers", 0) > 0:
            loader.worker_init_fn = QuietWorkerInit(loader.worker_init_fn)
        it = iter(loader)  # the workers start with the handler (a flag), then ignore the signals (QuietWorkerInit)
        bar = progress_bar(max_update, step, dinfo.is_main and tr["progress_bar"])
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        sharded = world > 1
        losses: list[float] = []
        # the log window's sums over its updates (a skipped try is none: its time counts into the next update's)
        # ("timed": the updates whose time is in data and step: not the run's first one in a longer window)
        # data: waiting for the loader; data_idle: the part of it the GPU surely waits too (the first micro-batch's:
        # while a later one is fetched, the GPU still runs the micro-batches already launched)
        win = dict.fromkeys(("loss", "mae_loss", "region_loss", "grad_norm", "n", "data", "data_idle", "step", "timed"),
                            0.0)
        vis_every = tr["visualize_interval"]
        interrupted = None
        errors = errors_before  # unreadable images skipped for the samples trained on so far, all ranks
        t_log = time.perf_counter()

        # the data position the newest checkpoint resumes at: every try (update or skipped) moves the position,
        # so a run that did anything since that checkpoint has another one
        saved_position = position

        def checkpoint_now(s: int):
            nonlocal saved_position
            extra = {"data_position": position, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "skipped": skipped, "data_errors": errors, "config": to_yaml(cfg),
                     "config_identity": config_identity(cfg["config"]), "data_root": data_root(cfg)}
            stop_if_launcher_gone()
            with stop.holding():
                path = ckpt.save_checkpoint(run_dir, model=model, optimizer=optimizer, step=s, extra=extra,
                                            keep=tr["num_checkpoint"], is_main=dinfo.is_main)
                saved_position = position
                if dinfo.is_main:
                    log.event("checkpoint", step=s, file=str(path))

        def pictures_now(s: int):
            path = visualize_now(model, raw, cfg, vis_batch, run_dir, s, device, autocast, dinfo)
            if path is not None:
                log.event("pictures", step=s, file=str(path))

        first_step, in_a_row = step, 0  # in_a_row: the tries of the current update skipped so far
        warned_data_bound = False
        pinned = device.type == "cuda" and tr["pin_memory"]  # (as the loader's batches)
        console.enter_context(console_above(bar))
        while step < max_update:
            t0 = time.perf_counter()
            t_data = t_data_idle = 0.0
            scheduler.set(step)
            acc = torch.zeros(3, dtype=torch.float32, device=device)  # loss, mae_loss, region_loss (means)
            replaced = 0  # unreadable images this rank's micro-batches skipped
            # this rank's rows of the step's noise table, in the order of its micro-batches: rows of the table are
            # the samples' offsets in the update (their sampler draw minus step * G), and micro-batch m of rank r
            # holds offsets m*b*W + i*W + r. One copy per update, from pinned memory: no stall of the GPU
            noise_rows = step_noise(tr["seed"], step, G, num_patches)[rank::world]
            noise_rows = noise_rows.contiguous().pin_memory() if pinned else noise_rows
            noise_rows = noise_rows.to(device, non_blocking=True)
            for m in range(A):
                td = time.perf_counter()
                batch = next_batch(it)
                t_data += time.perf_counter() - td
                if m == 0:
                    t_data_idle = t_data
                replaced += int(batch["replaced"].sum()) if "replaced" in batch else 0
                images, regions = to_device(batch, device, num_region)
                noise = noise_rows[m * b:(m + 1) * b]
                if "noise" in batch:  # region_sample_type=random_fg: the loader drew the masks with the regions
                    noise = batch["noise"].to(device, non_blocking=True)
                if sharded:
                    model.set_requires_gradient_sync(m == A - 1)
                with autocast:
                    out = model(images, regions, noise=noise, mask_ratio=sec["mask_ratio"])
                scaler.scale(out.loss.float() / A).backward()
                zero = out.loss.new_zeros(())
                acc += torch.stack([out.loss, out.mae_loss if out.mae_loss is not None else zero,
                                    out.region_loss if out.region_loss is not None else zero]).detach().float() / A
            position += G
            if amp_dtype == torch.float16:
                scaler.unscale_(optimizer)
            gnorm = grad_norm(params)
            # one small all-reduce: mean losses, non-finite loss on any rank, stop requested on any rank, unreadable
            # images skipped for this update's samples
            flags = torch.cat([acc, (~torch.isfinite(acc[:1])).float(),
                               torch.full((1,), float(stop.signal is not None), device=device),
                               torch.full((1,), float(replaced), device=device),
                               torch.full((1,), float(rdist.launcher_gone()), device=device)])
            if sharded:
                torch.distributed.all_reduce(flags)
                flags[:3] /= world
            flags = flags.double().cpu()
            if flags[6].item() > 0:  # (on every rank at once: none waits in a collective for the others)
                raise LauncherGone(LAUNCHER_GONE)
            finite = flags[3].item() == 0 and math.isfinite(gnorm.item())
            errors += int(flags[5].item())
            if finite:
                if tr["max_norm"] > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, tr["max_norm"], gnorm.to(device))
                scaler.step(optimizer)
                scaler.update()
            else:
                skipped += 1
                back_off(scaler)
                # numbered as the update it was (and is tried again as)
                log.event("skip", step=step + 1, loss=flags[0].item(), grad_norm=gnorm.item(), skipped=skipped)
            optimizer.zero_grad(set_to_none=True)
            in_a_row = 0 if finite else in_a_row + 1
            if 0 < tr["max_skips_in_a_row"] <= in_a_row:
                raise TrainingDiverged(
                    f"{in_a_row} tries in a row of update {step + 1}, each on a new batch, had a non-finite loss or "
                    f"gradient, so the weights have not changed since step {step}; the run stops "
                    f"(training.max_skips_in_a_row={tr['max_skips_in_a_row']}). Resume from the last checkpoint "
                    "with a lower optimizer.params.lr, training.max_norm > 0 or training.use_fp16=bfloat16 instead "
                    "of float16")
            win["data"] += t_data
            win["data_idle"] += t_data_idle
            win["step"] += time.perf_counter() - t0  # (a skipped try's time counts into the update's)
            if not finite:  # as the original: the update is tried again on the next batch, and a skipped try
                if flags[4].item() > 0:  # counts neither towards max_update nor in the lr schedule
                    interrupted = int(flags[4].item())
                    break
                continue
            lr = scheduler.get_last_lr()[0]
            step += 1
            if step == first_step + 1 and "RMAE_KERNELS_CHECK_INDICES" not in os.environ:
                # the first update has validated the masking indices; later ones skip the checks' host syncs
                kernels.set_index_checks(False)
            loss_v = flags[0].item()
            losses.append(loss_v)
            win["loss"] += loss_v
            win["mae_loss"] += flags[1].item()
            win["region_loss"] += flags[2].item()
            win["grad_norm"] += gnorm.item()
            win["n"] += 1
            win["timed"] += 1
            bar.update(1)
            if step == first_step + 1 and step % tr["log_interval"] and step != max_update:
                # the first update carries the start-up (the loader's workers, the compilation): the rates and times
                # of its window are those of the updates after it
                win["data"] = win["data_idle"] = win["step"] = win["timed"] = 0.0
                t_log = time.perf_counter()
            if step % tr["log_interval"] == 0 or step == max_update:
                n, timed = win["n"], win["timed"]
                mean_loss = {k: win[k] / n for k in ("loss", "mae_loss", "region_loss")}
                elapsed = time.perf_counter() - t_log
                rec = {"step": step, "loss": mean_loss["loss"]}  # its terms next to it
                if raw.use_mae_loss:
                    rec["mae_loss"] = mean_loss["mae_loss"]
                if num_region > 0:
                    rec["region_loss"] = mean_loss["region_loss"]
                rec.update({"lr": lr, "grad_norm": win["grad_norm"] / n, "img_per_s": G * timed / max(elapsed, 1e-9),
                            "step_time": win["step"] / timed, "data_time": win["data"] / timed,
                            "compute_time": (win["step"] - win["data"]) / timed, "peak_mem_mb": peak_memory_mb(device),
                            "skipped": skipped, "data_errors": errors})
                log.log(rec)  # with the bar on, above it (console_above)
                if dinfo.is_main and device.type == "cuda" and step - n > first_step and not warned_data_bound:
                    message = data_bound_warning(win["data_idle"] / timed, rec["step_time"], tr["num_workers"],
                                                 cores_per_rank(), source)
                    if message is not None:  # once a run (data_time is in every log record)
                        warned_data_bound = True
                        warn_and_record(log, "data_bound", message, data_time=rec["data_time"],
                                        step_time=rec["step_time"])
                bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "mae_loss", "region_loss", "img_per_s")
                                 if k in rec})
                win = dict.fromkeys(win, 0.0)
                t_log = time.perf_counter()
            if flags[4].item() > 0:
                interrupted = int(flags[4].item())
                break
            t_write = time.perf_counter()
            if step % tr["checkpoint_interval"] == 0 and step < max_update:
                checkpoint_now(step)
            if vis_every and step % vis_every == 0 and step < max_update:
                pictures_now(step)
            t_log += time.perf_counter() - t_write  # img_per_s is the training's rate, without these writes
        bar.close()  # (the lines below are the run's last: not followed by the bar drawn again)
        # final (or interrupted) checkpoint; also after skipped tries since the last one (their batches are used)
        if saved_position != position:
            checkpoint_now(step)
        if interrupted is None:
            pictures_now(step)
            load_with = export_now(model, optimizer, run_dir, dinfo)
            log.event("done", step=step, skipped=skipped, encoder=str(run_dir / "encoder.safetensors"),
                      **({"load_with": load_with} if load_with else {}))
        else:
            log.event("interrupted", step=step, signal=stop.signal,
                      message="checkpoint saved; run the same command again to continue")
    except BaseException as e:
        translated = in_config_terms_error(cfg, e)  # a missing mask (at start or in a batch): in config keys
        if isinstance(e, LauncherGone):  # nothing written into a folder a restarted run may hold
            pass
        elif isinstance(e, KeyboardInterrupt):  # a second Ctrl-C (or one before the stop handler was installed)
            log.log({"event": "interrupted", **({"step": step} if step else {}), "signal": "SIGINT",
                     "message": "stopped at once, without a checkpoint of the update in flight"}, console=False)
        elif not isinstance(e, SystemExit):  # (the console gets main()'s 'error: ...' line)
            # (no step before the first update: a failed start is no history that a retry would set aside)
            log.log({"event": "error", **({"step": step} if step else {}), "type": type(e).__name__,
                     "message": str(translated or e)}, console=False)
        if translated is not None:
            raise translated from e
        raise
    finally:
        kernels.set_index_checks(None)
        stop.restore()
        warnings.formatwarning = formatwarning
        console.close()
        if bar is not None:
            bar.close()
        log.close()
        with contextlib.suppress(Exception):
            if "it" in locals() and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
    summary = {"run_dir": str(run_dir), "step": step, "losses": losses, "skipped": skipped,
               "interrupted": interrupted is not None}
    rdist.cleanup()
    return summary


def warn_and_record(log: RunLogger, event: str, warning: str, **fields) -> None:
    """A warning on the console and the event in ``log.jsonl`` (not printed a second time)."""
    logger.warning("%s", warning)
    log.log({"event": event, **fields}, console=False)


def console_above(bar):
    """While a tqdm bar is on, the console log lines go through ``tqdm.write``: above the bar, not glued onto it."""
    if not hasattr(bar, "disable"):  # the silent stand-in
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logger], tqdm_class=type(bar))


def export_now(model, optimizer, run_dir: Path, dinfo) -> str:
    """``encoder.safetensors`` (timm ViT keys) from the full state, written by rank 0; returns (on every rank) the
    ``timm.create_model(...)`` call that builds its model, or ``""``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from rmae.models import save_encoder
    from rmae.models.export import model_num_heads, timm_call

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write() -> str:
        tmp = run_dir / ".encoder.safetensors.tmp"
        meta = save_encoder(ckpt.clean_state_dict(sd), str(tmp) + ".safetensors", num_heads=model_num_heads(model))
        ckpt.flush_to_disk(str(tmp) + ".safetensors")
        os.replace(str(tmp) + ".safetensors", run_dir / "encoder.safetensors")
        return timm_call(meta)

    return rdist.from_main_rank(write, dinfo.is_main)  # (a failed write: every rank's error)


@torch.no_grad()
def visualize_now(model, raw, cfg, vis_batch, run_dir: Path, step: int, device, autocast, dinfo) -> Path | None:
    """Collective forward on a fixed batch (every rank), rank 0 writes ``vis/step_XXXXXXXX.png``; returns its path."""
    if vis_batch is None:
        return None
    from rmae.visualize import save_visualization

    images, region_parts = vis_batch
    batch = {"image": images, **region_parts}
    imgs, regions = to_device(batch, device, raw.num_region)
    if "noise" in region_parts:  # random_fg: the regions were drawn among the patches this mask leaves visible
        noise = region_parts["noise"].to(device)
    else:
        noise = step_noise(cfg["training"]["seed"] + 1, 0, imgs.shape[0], raw.num_patches).to(device)
    was_training = model.training
    model.eval()
    # Eager: a compiled model would recompile for this batch shape and for no_grad. One process: its forward.
    # Sharded: through __call__, whose FSDP hooks gather the parameters, with compiled code set aside.
    sharded = torch.distributed.is_initialized()
    fwd = model if sharded else model.forward
    with autocast, torch.compiler.set_stance("force_eager") if sharded else contextlib.nullcontext():
        out = fwd(imgs, regions, noise=noise, mask_ratio=model_section(cfg)["mask_ratio"])
    model.train(was_training)

    def write() -> Path:
        path = run_dir / "vis" / f"step_{step:08d}.png"
        save_visualization(path, raw, imgs, regions, out, title=f"step {step}")
        return path

    return rdist.from_main_rank(write, dinfo.is_main)  # (a failed write: every rank's error)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
class _Once(argparse.Action):
    """An option given at most once (a second --config silently replaced the first: a file lists others under
    includes:)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): give one file; "
                         "a file can list others under includes:")
        setattr(namespace, self.dest, values)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog=command_name("rmae-train", "rmae.train"),
        description="R-MAE / MAE / RAE pre-training. Without arguments: a small demo on bundled photos.",
        epilog="Overrides are dotted keys, e.g. training.batch_size=256 model_config.rmae.mask_ratio=0.75")
    p.add_argument("--config", default=None, action=_Once, help="config file: a path or a shipped name such as "
                   "RMAE/COCO/rmae_fh_4000eps.yaml (default: the demo, default.yaml)")
    p.add_argument("--model", choices=MODELS, default=None, help="rmae (pixels and regions), mae (pixels only) or rae "
                   "(regions only); default: the config's, else rmae")
    p.add_argument("--task", choices=TASKS, default=None, help="the original's --task (only pretrain)")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="imagenet: the same as imnet",
                   type=dataset_name)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run folder "
                   "(an error when there is none); a run folder with checkpoints is continued anyway unless "
                   "training.resume=false")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value with the original's key names, e.g. "
                   "training.max_update=1000 (README: the key list; --print-config: every key and its value)")
    return p.parse_intermixed_args(argv)  # overrides may come before, between and after the options


# Bad settings, missing dataset, unusable data, missing or unreadable checkpoint: a message, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, ckpt.CheckpointError, DataError, TrainingDiverged)


STOPPED_AT_ONCE = ("\ninterrupted without a checkpoint of the current update; run the same command again to continue "
                   "from the last checkpoint, if the run has one")  # a second Ctrl-C (or one while the run sets up)


def _spawned(local_rank: int, world_size: int, port: int, cfg_yaml: str, require_resume: bool) -> None:
    from omegaconf import OmegaConf

    from rmae.cli import ctrl_c_as_usual

    ctrl_c_as_usual()  # (the rank has loaded this module: see the top)
    rdist.watch_launcher(os.getppid())
    rdist.spawn_env(local_rank, world_size, port)
    if "OMP_NUM_THREADS" not in os.environ:  # the ranks share the cores (as torchrun's ranks share one thread each)
        torch.set_num_threads(cores_per_rank())  # (over LOCAL_WORLD_SIZE, which spawn_env sets)
    status = 0
    try:
        train(OmegaConf.create(cfg_yaml), require_resume=require_resume)
    except (*USER_ERRORS, LauncherGone) as e:  # as on one process: a message and status 2 (1: the launcher died)
        print(f"error{'' if local_rank == 0 else f' (rank {local_rank})'}: {e}", file=sys.stderr)
        status = 1 if isinstance(e, LauncherGone) else 2
    except KeyboardInterrupt:  # a second Ctrl-C: as on one process
        if local_rank == 0:
            print(STOPPED_AT_ONCE, file=sys.stderr)
        status = 130
    except Exception:  # a bug: its traceback, and the rank still ends through exit_rank
        traceback.print_exc()
        status = 1
    rdist.exit_rank(status)  # (past the except blocks: the error's traceback, and the frames it holds, are freed)


def unused_sections(overrides, model: str, dataset: str) -> list[tuple[str, str]]:
    """(section, the one read) for the ``model_config.<other>`` and ``dataset_config.<other>_pretrain`` sections set
    on the command line while the run reads only its model's and its dataset's."""
    found = set()
    for o in overrides:
        if (m := re.match(r"model_config\.(\w+)", o.lstrip("+"))) and m.group(1) != model:
            found.add((m.group(0), f"model_config.{model}"))
        if (m := re.match(r"dataset_config\.(\w+)", o.lstrip("+"))) and m.group(1) != f"{dataset}_pretrain":
            found.add((m.group(0), f"dataset_config.{dataset}_pretrain"))
    return sorted(found)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # a Ctrl-C while the settings are checked, before the run has a folder
        print("\ninterrupted before training started; nothing was written", file=sys.stderr)
        return 130


def command(argv=None) -> int:
    """``main`` as the command line runs it (``python -m rmae.train``, ``rmae-train``): a rank of torchrun or srun
    ends through ``exit_rank`` with main's status, or 1 after an unexpected error (whose traceback it prints);
    one process returns the status. (A spawned rank ends in ``_spawned``.)"""
    try:
        status = main(argv)
    except Exception:
        if not rdist.joined_a_group():
            raise
        traceback.print_exc()
        status = 1
    if rdist.joined_a_group():
        rdist.exit_rank(status)
    return status


def _main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, model=args.model, task=args.task, dataset=args.dataset)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for section, read in unused_sections(args.overrides, cfg["model"], cfg["dataset"]):
        print(f"warning: the overrides of {section}.* have no effect: this run reads {read}", file=sys.stderr)
    if args.resume:
        if not cfg.training.resume:
            print("error: --resume (continue from the newest checkpoint) contradicts training.resume=false (start "
                  "afresh); give one of them", file=sys.stderr)
            return 2
        cfg.training.resume = True
    if args.print_config:
        print(to_yaml(cfg) + arch_defaults_comment(cfg) + formulas_comment(cfg))
        return 0
    try:
        # The model and optimizer the settings describe, on the meta device (no memory, a fraction of a second):
        # a setting they refuse (ValueError) is an error now, before any process starts or any file is written.
        build_optimizer(cfg, build_model_from_config(cfg, "meta"))
        data_folders(cfg)  # folder lists that pair up
        nproc = rdist.resolve_launch(cfg["distributed"], cfg["training"]["device"])  # checks training.device
        check_launch(cfg, nproc if nproc > 1 else int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as e:  # ConfigError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as held:
        one_cpu_process = nproc <= 1 and int(os.environ.get("WORLD_SIZE", 1)) == 1 and \
            not rdist.uses_cuda(cfg["training"]["device"])
        if one_cpu_process and "OMP_NUM_THREADS" not in os.environ:
            threads, note = threads_beside_other_jobs(torch.get_num_threads())
            if note:
                print(note, file=sys.stderr)
                held.callback(torch.set_num_threads, torch.get_num_threads())  # (main() called in a process)
                torch.set_num_threads(threads)
        if int(os.environ.get("RANK", 0)) == 0:  # one process, the launcher of spawned ranks, or rank 0 of torchrun/srun
            try:
                held.enter_context(ckpt.hold_run_folder(run_dir_of(cfg)))
            except (ckpt.CheckpointError, OSError) as e:  # in use, a file in the way, a read-only place
                print(f"error: {e}", file=sys.stderr)
                return 2
        return _run(cfg, args, nproc)


def _run(cfg, args, nproc: int) -> int:
    """Trains in this process, or spawns ``nproc`` ranks and waits for them; the exit status."""
    if nproc > 1:
        import torch.multiprocessing as mp

        port = cfg["distributed"]["port"] if cfg["distributed"]["port"] > 0 else rdist.free_port()
        ranks = mp.start_processes(_spawned, args=(nproc, port, to_yaml(cfg), args.resume), nprocs=nproc,
                                   join=False, start_method="spawn")
        # A terminal's Ctrl-C reaches the ranks too (one process group): they checkpoint and exit (0), or stop at
        # once on a second one (130); the launcher waits for them and reports theirs. A third (ranks stuck, e.g.
        # in a collective) kills them.
        presses = []

        def interrupted(signum, frame):
            presses.append(signum)
            if len(presses) == 3:
                print("\nthird Ctrl-C: killing the ranks", file=sys.stderr)
                for process in ranks.processes:
                    if process.is_alive():
                        process.kill()

        def passed_on(signum, frame):  # SIGTERM, SIGUSR1 to the launcher alone (kill, timeout, a container's stop)
            for process in ranks.processes:
                if process.is_alive():
                    os.kill(process.pid, signum)

        previous = {signal.SIGINT: signal.signal(signal.SIGINT, interrupted)}
        for signum in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if signum is not None:
                previous[signum] = signal.signal(signum, passed_on)
        try:
            while not ranks.join():
                pass
        except mp.ProcessExitedException as e:  # a rank exited (its message is printed); the others are stopped
            return e.exit_code if e.exit_code and e.exit_code > 0 else 1
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0
    try:
        train(cfg, require_resume=args.resume)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        rdist.leave_after_error()  # (a rank of torchrun or srun)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C
        print(STOPPED_AT_ONCE, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from rmae.cli import ctrl_c_as_usual

    ctrl_c_as_usual()
    sys.exit(command())
