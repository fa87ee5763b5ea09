"""Configuration: the original's key names, merged defaults <- ``includes:`` <- file <- command line.

A config file is read from a path, or by name from the package (``RMAE/COCO/rmae_fh_4000eps.yaml``; a leading
``config/`` or ``configs/`` as in the original's ``includes:`` is accepted). An include of a file outside the
package is looked up next to that file, then in the current directory, then in the package (and a note says
when the package's copy is used). Every key is checked against ``SCHEMA``: an unknown key is an error that names
the closest valid keys, every value is type-checked (before interpolations are resolved) and range-checked, and
the model the settings describe is checked (dimensions, heads, image and patch sizes). A section left empty
(``optimizer:`` with nothing below it, or ``section=null`` on the command line) changes nothing, as the
original's ``optimizer: {}`` does; a section given a value that is not a mapping is an error.

``${scaled_lr:BASE}`` is ``BASE * training.batch_size / 256`` (the paper's rule), so overriding the batch size
rescales the learning rate of the shipped recipes (the demo, ``default.yaml``, fixes its own).
"""
from __future__ import annotations

import contextvars
import difflib
import math
import os
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from rmae.recipes import dataset_name

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "default.yaml"  # the small demo run of ``python -m rmae.train`` without arguments
MODELS = ("mae", "rae", "rmae")
DATASETS = ("coco", "imnet", "sample")
TASKS = ("pretrain",)
ARCHS = ("rmae_tiny_patch16", "rmae_small_patch16", "rmae_base_patch16", "rmae_large_patch16", "rmae_huge_patch14")


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and what would be valid."""


# ---------------------------------------------------------------------------------------------------------------
# Schema: every valid key, its type and its default
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """The values a number may take: ``lo``/``hi`` bounds (None: unbounded), open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)  # > 0
NONNEG = Range(0)  # >= 0
AT_LEAST_1 = Range(1)
OPEN_UNIT = Range(0, 1, lo_open=True, hi_open=True)  # (0, 1)
UNIT = Range(0, 1)  # [0, 1]


@dataclass(frozen=True)
class Spec:
    kind: str  # int | float | bool | str | floats | strs | any
    default: Any = None
    nullable: bool = False
    choices: tuple | None = None
    length: int | None = None  # for floats
    doc: str = ""
    legacy: bool = False  # accepted for compatibility with the original's files, no effect here
    range: Range | None = None  # numbers (each element of floats)
    special: tuple = ()  # values allowed outside ``range`` (distributed.port=-1)
    ordered: bool = False  # floats: non-decreasing (low <= high)
    pattern: str | None = None  # str: a regular expression the whole value must match
    pattern_doc: str = ""  # what ``pattern`` accepts, in words


def _i(d, **kw):
    return Spec("int", d, **kw)


def _f(d, **kw):
    return Spec("float", d, **kw)


def _b(d, **kw):
    return Spec("bool", d, **kw)


def _s(d, **kw):
    return Spec("str", d, **kw)


def _legacy(d=None):
    return Spec("any", d, nullable=True, legacy=True)


def _model_section() -> dict:
    """``model_config.<model>``; params left null take the architecture's (``rmae.models.ARCHS``) values."""
    return {
    "mask_ratio": _f(0.75, range=OPEN_UNIT),
    "mae_vit": {
        "arch": _s("rmae_base_patch16"),
        "params": {
            "img_size": _i(None, nullable=True, range=POSITIVE, doc="a multiple of the patch size"),
            "norm_pix_loss": _b(None, nullable=True),
            "use_mae_loss": _b(None, nullable=True),
            "num_region": _i(None, nullable=True, range=NONNEG),
            "mae_loss_weight": _f(None, nullable=True, range=NONNEG),
            "bg_loss_weight": _f(None, nullable=True, range=NONNEG),
            "region_loss_weight": _f(None, nullable=True, range=NONNEG),
            "region_mask_ratio": _f(None, nullable=True, range=OPEN_UNIT),
            "region_enc_dim": _i(None, nullable=True, range=POSITIVE),
            "region_enc_depth": _i(None, nullable=True, range=NONNEG),
            "region_enc_num_heads": _i(None, nullable=True, range=AT_LEAST_1),
            "region_dec_dim": _i(None, nullable=True, range=POSITIVE),
            "region_dec_depth": _i(None, nullable=True, range=AT_LEAST_1),
            "region_dec_num_heads": _i(None, nullable=True, range=AT_LEAST_1),
            "region_sample_type": _s(None, nullable=True, choices=("random", "random_fg")),
            "region_cross_layer": _i(None, nullable=True, range=NONNEG),
            "decoder_embed_dim": _i(None, nullable=True, range=POSITIVE),
            "decoder_depth": _i(None, nullable=True, range=NONNEG),
            "decoder_num_heads": _i(None, nullable=True, range=AT_LEAST_1),
            "kernel_impl": _s(None, nullable=True, choices=("auto", "triton", "reference")),
        },
    },
    }


def _dataset_section(image_folder, mask_folder, anno_file, region_source):
    """``dataset_config.<dataset>_pretrain``; ``imdb_files.train`` decides the training folders (relative paths are
    under <data_dir>/coco/ or <data_dir>/imagenet/ (else imnet/), absolute ones as they are). The original's
    ``imdb_files.val`` (validation folders) is accepted and has no effect: there is no validation pass."""
    split = lambda i, m, a: {  # noqa: E731
        "image_folder": Spec("strs", i, nullable=True, doc="image folders"),
        "mask_folder": Spec("strs", m, nullable=True,
                            doc="FH mask folders, one per image folder; null: fh_<name> beside each image folder"),
        "anno_file": Spec("strs", a, nullable=True,
                          doc="COCO-style json listing each image folder's images; null: list the folder"),
    }
    return {
        "data_dir": _s(None, nullable=True, doc="dataset root; default $E2E_DATASETS or .data"),
        "split": _s(None, nullable=True, doc="set: that split's standard folders, imdb_files.train unused; "
                                             "null: the folders of imdb_files.train"),
        "sampler": _s("infinite", choices=("infinite", "shard")),
        "mask_type": _s("fh", choices=("fh",)),
        "region_source": _s(region_source, choices=("offline", "online", "online_crop", "none")),
        "cache_bytes": _i(8 << 30, range=NONNEG, doc="shard sampler: per-rank bound on cached encoded bytes"),
        "filter_small_patches": _b(False),
        "label_resize": _s("center", choices=("center", "floor")),
        "crop_scale": Spec("floats", [0.2, 1.0], length=2, range=Range(0, 1, lo_open=True), ordered=True,
                           doc="RandomResizedCrop area fraction (low, high)"),
        "crop_ratio": Spec("floats", [0.75, 4.0 / 3.0], length=2, range=POSITIVE, ordered=True,
                           doc="RandomResizedCrop aspect ratio (low, high)"),
        "cache_mask": _legacy(),
        "cache_mode": _legacy(),
        "imdb_files": {"train": split(image_folder, mask_folder, anno_file), "val": _legacy()},
        "processors": _legacy(),
    }


SCHEMA: dict = {
    "includes": Spec("strs", [], nullable=True),
    "config": _s(None, nullable=True),
    "model": _s("rmae", choices=MODELS),
    "task": _s("pretrain", choices=TASKS),
    "dataset": _s("sample", choices=DATASETS),
    "training": {
        "max_update": _i(144000, range=POSITIVE),
        "batch_size": _i(4096, range=POSITIVE, doc="global batch (all ranks, all accumulation steps)"),
        "iter_per_update": _i(1, range=POSITIVE),
        "use_fp16": _s("none", choices=("none", "float16", "bfloat16")),
        "use_compile": _b(None, nullable=True, doc="null: on for CUDA, off on CPU"),
        "max_norm": _f(0.0, range=NONNEG, doc="0: no clipping"),
        "max_skips_in_a_row": _i(100, range=NONNEG, doc="skipped (non-finite) tries of an update in a row that "
                                                        "end the run as diverged; 0: no limit"),
        "seed": _i(0, range=Range(0, 2**32, hi_open=True), special=(-1,), nullable=True,
                   doc="-1 or null: a random seed, drawn once and recorded (config.yaml, checkpoints)"),
        "log_interval": _i(200, range=POSITIVE),
        "checkpoint_interval": _i(1000, range=POSITIVE),
        "num_checkpoint": _i(2, range=AT_LEAST_1),
        "save_dir": _s(None, nullable=True, doc="run folder; null: runs/<experiment_name>"),
        "experiment_name": _s(None, nullable=True),
        "num_workers": _i(4, range=NONNEG, doc="0: load in the main process"),
        "pin_memory": _b(True),
        "tensorboard": _b(False),
        "tensorboard_logdir": _s(None, nullable=True),
        "resume": _b(True, doc="continue from the newest checkpoint in the run folder when there is one"),
        "resume_file": _s(None, nullable=True),
        "visualize_interval": _i(0, range=NONNEG, doc="0: only at the end"),
        "progress_bar": _b(True),
        "device": _s(None, nullable=True, pattern=r"cpu|cuda(:\d+)?",
                     pattern_doc="cpu, cuda, cuda:N (one process on GPU N), or null (cuda when available, else cpu)",
                     doc="null: cuda when available, else cpu"),
        # Keys of the original's files that have no effect here.
        "trainer": _legacy(), "max_epoch": _legacy(), "run_type": _legacy(), "evaluation_interval": _legacy(),
        "find_unused_parameters": _legacy(), "iou_type": _legacy(), "logger_level": _legacy(),
        "log_format": _legacy(), "log_detailed_config": _legacy(), "should_not_log": _legacy(),
        "verbose_dump": _legacy(), "local_rank": _legacy(),
    },
    "model_config": {"mae": _model_section(), "rae": _model_section(), "rmae": _model_section()},
    "dataset_config": {
        "coco_pretrain": _dataset_section(["image/train2017"], ["image/fh_train2017"],
                                          ["annotations/instances_train2017.json"], "offline"),
        "imnet_pretrain": _dataset_section(["train"], ["fh_train"], None, "offline"),
        "sample_pretrain": _dataset_section(None, None, None, "online"),
    },
    "optimizer": {
        "type": _s("adamw", choices=("adamw",)),
        "params": {
            "lr": _f("${scaled_lr:1.5e-4}", range=POSITIVE, doc="1.5e-4 * training.batch_size / 256"),
            "weight_decay": _f(0.05, range=NONNEG),
            "wd_norm": _f(0.0, range=NONNEG),
            "wd_bias": _f(0.0, range=NONNEG),
            "eps": _f(1e-8, range=POSITIVE, doc="AdamW's denominator term (0: a parameter without gradient "
                      "divides 0 by 0)"),
            "betas": Spec("floats", [0.9, 0.95], length=2, range=Range(0, 1, hi_open=True)),
            "use_oss": _legacy(False),
        },
    },
    "scheduler": {
        "type": _s("cosine_annealing", choices=("cosine_annealing",)),
        "params": {
            "T_max": _i("${training.max_update}", range=POSITIVE),
            "eta_min": _f(0.0, range=NONNEG),
            "use_warmup": _b(True),
            "warmup_factor": _f(0.0, range=UNIT, doc="the warm-up starts at warmup_factor * lr"),
            "warmup_iterations": _i(12000, range=NONNEG),
        },
    },
    "distributed": {
        "backend": _s(None, nullable=True, choices=("nccl", "gloo"), doc="null: nccl on GPU, gloo on CPU"),
        "init_method": _s(None, nullable=True),
        "port": _i(-1, range=Range(1, 65535), special=(-1,), doc="-1: a free port"),
        "world_size": _i(None, nullable=True, range=AT_LEAST_1,
                         doc="processes to spawn on one node; null: all visible GPUs"),
        "no_spawn": _b(False),
        "rank": _legacy(0),
    },
}


def _flat_specs(tree: dict, prefix: str = "") -> dict[str, Spec]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_specs(v, key + "."))
        else:
            out[key] = v
    return out


FLAT_SCHEMA: dict[str, Spec] = _flat_specs(SCHEMA)
_SECTIONS = {k.rsplit(".", 1)[0] for k in FLAT_SCHEMA if "." in k} | {
    ".".join(k.split(".")[:i]) for k in FLAT_SCHEMA for i in range(1, k.count(".") + 1)}


def defaults() -> dict:
    def build(tree):
        return {k: (build(v) if isinstance(v, dict) else _copy(v.default)) for k, v in tree.items()}

    return build(SCHEMA)


def _copy(x):
    return list(x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------------------------------------
# Resolvers
# ---------------------------------------------------------------------------------------------------------------
def _scaled_lr(base, batch_size) -> float:
    return float(base) * float(batch_size) / 256.0


def _scaled_lr_resolver(base, _root_):
    # Literal values are type-checked before resolving; this catches a batch size that is itself an interpolation.
    batch_size = _root_.training.batch_size if isinstance(_root_.get("training"), DictConfig) else None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ConfigError(f"training.batch_size must be an integer (the learning rate ${{scaled_lr:{base}}} is "
                          f"scaled by it), got {batch_size!r} ({type(batch_size).__name__})")
    try:
        return _scaled_lr(base, batch_size)
    except (TypeError, ValueError):
        raise ConfigError(f"${{scaled_lr:BASE}} needs a number BASE, got {base!r}") from None


if not OmegaConf.has_resolver("scaled_lr"):
    _register = getattr(OmegaConf, "register_resolver", None)
    if _register is not None and "replace" in __import__("inspect").signature(_register).parameters:
        _register("scaled_lr", _scaled_lr_resolver)
    else:  # omegaconf 2.1 - 2.3
        OmegaConf.register_new_resolver("scaled_lr", _scaled_lr_resolver)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def shipped_configs() -> list[str]:
    """Names of the config files that ship with the package (relative to ``rmae/configs``)."""
    return sorted(str(p.relative_to(CONFIG_ROOT)) for p in CONFIG_ROOT.rglob("*.yaml"))


def _strip_prefix(name: str) -> str:
    for prefix in ("pretrain/config/", "config/", "configs/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def config_identity(path: str | os.PathLike | None, moved_install: bool = False) -> str | None:
    """What names a config file across installs: a shipped config by its name (``RMAE/COCO/...yaml``), any other
    by its resolved path. A copy under another install's ``rmae/configs/`` is the shipped config while its text
    is the shipped one; ``moved_install``: a path recorded in the past (an older install, perhaps gone or of
    another release), taken by its name alone."""
    if path is None:
        return None
    path = Path(path)
    if _in_package(path):
        return path.resolve().relative_to(CONFIG_ROOT).as_posix()
    parts = path.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i:i + 2] == ("rmae", "configs"):
            tail = "/".join(parts[i + 2:])
            if tail in shipped_configs():
                try:
                    same = moved_install or path.read_bytes() == (CONFIG_ROOT / tail).read_bytes()
                except OSError:
                    same = False
                if same:
                    return tail
            break
    return str(path.resolve())


def _in_package(path: Path) -> bool:
    try:
        path.resolve().relative_to(CONFIG_ROOT)
        return True
    except ValueError:
        return False


def find_config(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config path. ``--config``: the path as given, else the name inside the package. An include
    (``relative_to``: the including file's folder): next to the including file, then (for a file outside the
    package) in the current directory, then inside the package. The first of these that exists is used, so a
    user's own ``config/MAE/base_mae.yaml`` (the original's layout) wins over the package's copy."""
    name = str(name)
    stripped = _strip_prefix(name)
    literal = Path(name).expanduser()
    if relative_to is not None:
        candidates = [relative_to / literal]
        if not _in_package(relative_to):  # the package's own includes never depend on the current directory
            candidates.append(literal)
        candidates.append(CONFIG_ROOT / stripped)
    else:
        candidates = [literal, CONFIG_ROOT / stripped]
    for c in candidates:
        if c.is_dir():
            if _in_package(c):  # the shipped names below it
                rel = c.resolve().relative_to(CONFIG_ROOT).as_posix()
                inside = [n for n in shipped_configs() if rel == "." or n.startswith(rel + "/")][:5]
            else:  # this folder only: it may be a large tree
                inside = [str(c / n) for n in sorted(p.name for p in c.glob("*.yaml"))[:5]]
            raise ConfigError(f"config file {name!r} is a directory ({c}): give a .yaml file"
                              f"{', such as ' + ', '.join(inside) if inside else ''}")
        if c.is_file():
            return c
    close = difflib.get_close_matches(stripped, shipped_configs(), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped configs: {', '.join(shipped_configs())}"
    where = "as a path or in the package" if relative_to is None else \
        f"next to the including file in {relative_to}, in the current directory or in the package"
    raise ConfigError(f"config file {name!r} not found ({where}){hint}")


def _note(message: str) -> None:
    """A line on stderr from the launching process (rank 0 under torchrun / srun), not from every rank."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"note: {message}", file=sys.stderr)


def _load_file(path: Path, seen: tuple = ()) -> DictConfig:
    """The file merged over its ``includes:`` (each include first merged over its own includes)."""
    if path.resolve() in [p.resolve() for p in seen]:
        raise ConfigError(f"config includes form a cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(cfg).__name__}")
    if len(cfg) == 0:
        raise ConfigError(f"config file {path} is empty: give the keys to set (and includes: to start from)")
    includes = cfg.pop("includes", None) or []
    if isinstance(includes, (DictConfig, ListConfig)):
        includes = OmegaConf.to_container(includes, resolve=False)
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or any(not isinstance(i, str) for i in includes):
        raise ConfigError(f"includes in config file {path} must be a file name or a list of file names, "
                          f"got {includes!r}")
    tree = _normalize(OmegaConf.to_container(cfg, resolve=False), where=str(path))
    merged = OmegaConf.create({})
    for inc in includes:
        found = find_config(inc, relative_to=path.parent)
        if _in_package(found) and not _in_package(path):
            _note(f"{path}: include {inc!r} is not a file next to it or in the current directory; "
                  f"using the package's {found}")
        merged = _merge(merged, _load_file(found, seen + (path,)), where=str(found))
    return _merge(merged, OmegaConf.create(tree), where=str(path))


def _merge(base: DictConfig, top: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, top)
    except Exception as e:  # e.g. a mapping merged onto a list
        raise ConfigError(f"cannot merge {where} over the values before it: {e}") from e


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    unknown = []
    for o in items:
        if "=" not in o:
            file_hint = (f"; to read a config file, give it with --config {o}"
                         if o.endswith((".yaml", ".yml")) or os.path.isfile(o) else "")
            raise ConfigError(f"command-line override {o!r} is not of the form dotted.key=value{file_hint}")
        key = o.split("=", 1)[0].lstrip("+")
        if key.split(".")[0] in ("includes", "config"):
            raise ConfigError(f"command-line override {o!r}: {key.split('.')[0]} cannot be set on the command line; "
                              "give the config file with --config FILE (a file can list other files under includes:)")
        try:
            _check_key(key, where="command line")
        except ConfigError as error:  # (every unknown key is named)
            unknown.append(str(error))
    _raise(unknown)
    try:
        cfg = OmegaConf.from_dotlist([o.lstrip("+") for o in items])
    except Exception as e:
        raise ConfigError(f"cannot parse the command-line overrides: {e}") from e
    tree = OmegaConf.to_container(cfg, resolve=False)
    for i, o in enumerate(items):  # text settings keep their text: save_dir=0001 is the folder 0001, not the number 1
        key, text = o.lstrip("+").split("=", 1)
        if any(_sets(later.lstrip("+"), key) for later in items[i + 1:]):  # a later override of the key wins
            continue
        if _is_plain_text(FLAT_SCHEMA.get(key), text):
            parent = tree
            for part in key.split(".")[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if isinstance(parent, dict):  # (None: a later override set the section to null)
                parent[key.rsplit(".", 1)[-1]] = text.strip()
    return OmegaConf.create(_normalize(tree, where="command line"))


def _sets(override: str, key: str) -> bool:
    """Whether the override ``a.b=value`` sets ``key``: the same key, a key below it, or a section above it whose
    value is no mapping (null replaces the section) or a mapping that holds the rest of the key's path (a
    mapping is merged into the section: ``training={max_update: 3}`` leaves ``training.save_dir`` alone)."""
    other = override.split("=", 1)[0]
    if other == key or other.startswith(key + "."):
        return True
    if not key.startswith(other + "."):
        return False
    value = OmegaConf.to_container(OmegaConf.from_dotlist([override]), resolve=False)
    for part in other.split("."):
        value = value[part]
    for part in key[len(other) + 1:].split("."):
        if not isinstance(value, dict):
            return True
        if part not in value:
            return False
        value = value[part]
    return True


def _is_plain_text(spec: Spec | None, text: str) -> bool:
    """A command-line value of a text setting to take as written (YAML would make 0001, 2024, 1e3 or true a number
    or a boolean): not null, not quoted, not an interpolation, not a list."""
    if spec is None or spec.kind not in ("str", "strs"):
        return False
    text = text.strip()
    return text not in YAML_NULLS and text[0] not in "'\"[{" and "${" not in text


YAML_NULLS = ("", "~", "null", "Null", "NULL")


def load_config(config: str | os.PathLike | None = None, overrides: Iterable[str] = (), *,
                model: str | None = None, task: str | None = None, dataset: str | None = None) -> DictConfig:
    """defaults <- includes <- file <- overrides (<- --model/--task/--dataset), validated and resolved."""
    cfg = OmegaConf.create(defaults())
    path = find_config(config if config is not None else DEFAULT_CONFIG)
    cfg = _merge(cfg, _load_file(path), where=str(path))
    overrides = list(overrides)
    given = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1].strip().strip("'\"") for o in overrides if "=" in o}
    chosen_model = model or given.get("model") or cfg.get("model")
    chosen_dataset = dataset_name(dataset or given.get("dataset") or cfg.get("dataset"))
    token = _PREFERRED.set((chosen_model if chosen_model in MODELS else None,  # (a typo: no preference)
                            chosen_dataset if chosen_dataset in DATASETS else None))
    try:
        cfg = _merge(cfg, parse_overrides(overrides), where="the command-line overrides")
    finally:
        _PREFERRED.reset(token)
    cfg.config = str(path)
    for key, value in (("model", model), ("task", task), ("dataset", dataset)):
        if value is not None:
            cfg[key] = value
    if dataset_name(cfg.get("dataset")) != cfg.get("dataset"):  # imagenet in a file or an override, as --dataset
        cfg.dataset = dataset_name(cfg.dataset)
    return _expand_home(validate(cfg))


# Settings that name files or folders: ``~`` in them is the home folder (a shell leaves ``key=~/x`` alone)
_PATH_KEYS = ("save_dir", "tensorboard_logdir", "resume_file", "data_dir", "image_folder", "mask_folder", "anno_file")


def _expand_home(cfg: DictConfig) -> DictConfig:
    for key in FLAT_SCHEMA:
        if key.rsplit(".", 1)[-1] not in _PATH_KEYS:
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value), merge=False)
        elif isinstance(value, ListConfig) and any(isinstance(v, str) and v.startswith("~") for v in value):
            OmegaConf.update(cfg, key, [os.path.expanduser(v) if isinstance(v, str) else v for v in value],
                             merge=False)
    return cfg


def _is_interpolation(value) -> bool:
    return isinstance(value, str) and "${" in value


def _value_errors(tree: dict, skip_interpolations: bool = False) -> list[str]:
    errors = []
    for key, spec in FLAT_SCHEMA.items():
        value = _get(tree, key)
        if skip_interpolations and _is_interpolation(value):
            continue
        err = _check_value(key, value, spec)
        if err:
            errors.append(err)
    return errors


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else "invalid config:\n  " + "\n  ".join(errors))


# id(resolved config) -> {dotted key: the interpolation it was computed by}, for configs ``validate`` returns
_FORMULAS: dict[int, dict[str, str]] = {}


def _interpolations(tree, prefix: str = "") -> dict[str, str]:
    """{dotted key: value} of the string values of a plain config tree that hold an interpolation (``${...}``)."""
    found = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, str) and "${" in value:
            found[path] = value
        else:
            found.update(_interpolations(value, path))
    return found


def formulas_comment(cfg) -> str:
    """YAML comment lines naming the settings of ``cfg`` (a config from ``load_config``) computed from others, with
    their formulas: a copy of the printed config keeps only the numbers (an lr scaled for one batch size stays
    when the batch size changes), so the formulas are printed beside them."""
    found = _FORMULAS.get(id(cfg), {})
    if not found:
        return ""
    return ("# computed from other settings (a copy of this config keeps the values above; write the formula to "
            "keep the rule):\n" + "".join(f"#   {key}: {formula}\n" for key, formula in found.items()))


def validate(cfg: DictConfig) -> DictConfig:
    """Checks every key, value type and range (before interpolations are resolved too, so that an interpolation
    using a bad value is not what the error names), resolves the interpolations, checks again, then the model the
    settings describe; returns a fresh, resolved config. Every error names its full key."""
    raw = _normalize(OmegaConf.to_container(cfg, resolve=False), where="config")
    _raise(_value_errors(raw, skip_interpolations=True))
    try:
        container = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise ConfigError(str(cause)) from None
        raise ConfigError(f"cannot resolve config: {e}") from e
    c = _normalize(container, where="config")
    _raise(_value_errors(c))
    errors = []
    tr = c["training"]
    if tr["batch_size"] % tr["iter_per_update"]:
        errors.append(f"training.batch_size ({tr['batch_size']}) must be divisible by training.iter_per_update "
                      f"({tr['iter_per_update']})")
    lr, eta_min = c["optimizer"]["params"]["lr"], c["scheduler"]["params"]["eta_min"]
    if eta_min > lr:
        errors.append(f"scheduler.params.eta_min ({eta_min:g}) must not exceed optimizer.params.lr ({lr:g}): the "
                      "cosine goes from lr down to eta_min, so it would raise the lr")
    errors += _model_errors(c)
    _raise(errors)
    resolved = OmegaConf.create(c)
    _FORMULAS[id(resolved)] = _interpolations(raw)
    weakref.finalize(resolved, _FORMULAS.pop, id(resolved), None)
    return resolved


def _arch_values(arch: str, variant: str) -> dict:
    """The keyword arguments ``build_model`` gives the model before the config's params: the model's defaults,
    the architecture's values, the variant's."""
    import inspect

    from rmae.models.factory import ARCHS as ARCH_VALUES, VARIANTS
    from rmae.models.rmae import RMAE

    name = arch if arch.startswith("rmae_") else "rmae_" + arch.removeprefix("mae_")
    defaults_ = {k: p.default for k, p in inspect.signature(RMAE.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty}
    return {**defaults_, **ARCH_VALUES[name], **VARIANTS.get(variant, {})}


def _model_errors(c: dict) -> list[str]:
    """The model of ``model_config.<model>`` as ``build_model`` would make it: sizes that fit together."""
    model = c["model"]
    sec = model_section(c)
    pre = f"model_config.{model}"
    arch = sec["mae_vit"]["arch"]
    if arch not in ARCHS and canonical_arch(arch) not in ARCHS:
        close = difflib.get_close_matches(arch, ARCHS, n=2, cutoff=0.3)
        return [f"{pre}.mae_vit.arch={arch!r} is not an architecture (valid: {', '.join(ARCHS)})"
                f"{'; did you mean ' + ' or '.join(close) + '?' if close else ''}"]
    given = {k: v for k, v in sec["mae_vit"]["params"].items() if v is not None}
    arch_values = _arch_values(arch, model)
    p = built_model_params(c)

    def name(k):  # the key and its value (and where it comes from when the config leaves it null)
        return f"{pre}.mae_vit.params.{k} ({p[k]}{'' if k in given else f', the {arch} value'})"

    errors = []
    if model == "mae" and p["num_region"] != 0:
        errors.append(f"{pre}.mae_vit.params.num_region must be 0 for --model mae (no region branch), "
                      f"got {p['num_region']}")
    if model == "rae" and p["use_mae_loss"]:
        errors.append(f"{pre}.mae_vit.params.use_mae_loss must be false for --model rae (no pixel decoder)")
    if not p["use_mae_loss"] and p["num_region"] == 0:
        errors.append(f"{pre}.mae_vit.params: use_mae_loss is false and num_region is 0: the model has no loss")
    elif model == "rmae" and p["num_region"] == 0:  # the original's R-MAE base config has num_region: 0
        errors.append(f"{pre}.mae_vit.params.num_region is 0: --model rmae without regions would train plain MAE "
                      "(the original's base_rmae.yaml leaves it at 0, so its R-MAE runs trained none); set it to the "
                      "regions per image (8 in the paper's recipes), or use --model mae")
    patch = arch_values["patch_size"]
    if p["img_size"] % patch:
        errors.append(f"{pre}.mae_vit.params.img_size must be a multiple of the patch size {patch} of {arch}, "
                      f"got {p['img_size']}")
        return errors
    num_patches = (p["img_size"] // patch) ** 2

    def visible(key, ratio):
        keep = int(num_patches * (1 - ratio))
        if not 1 <= keep < num_patches:
            errors.append(f"{key}={ratio} leaves {keep} of the {num_patches} patches of a {p['img_size']} px image "
                          f"visible: at least one must stay visible and one be masked")

    visible(f"{pre}.mask_ratio", sec["mask_ratio"])
    if p["num_region"] > 0:
        visible(f"{pre}.mae_vit.params.region_mask_ratio", p["region_mask_ratio"])
    dims = []
    if p["use_mae_loss"]:
        dims.append(("decoder_embed_dim", "decoder_num_heads"))
    if p["num_region"] > 0:
        dims += [("region_enc_dim", "region_enc_num_heads"), ("region_dec_dim", "region_dec_num_heads")]
    for dim, heads in dims:
        if p[dim] % 4:
            errors.append(f"{name(dim)} must be a multiple of 4 (its 2-D sin-cos position table)")
        if p[dim] % p[heads]:
            errors.append(f"{name(heads)} must divide {name(dim)}")
    return errors


def model_section(cfg) -> dict:
    """``model_config.<model>``: the section of the chosen model."""
    return cfg["model_config"][cfg["model"]]


def dataset_section(cfg) -> dict:
    return cfg["dataset_config"][f"{cfg['dataset']}_pretrain"]


def canonical_arch(arch: str) -> str:
    """The original's MAE configs name ``mae_base_patch16``; the same network is ``rmae_base_patch16``."""
    return "r" + arch if arch.startswith("mae_") else arch


def built_model_params(c: dict) -> dict:
    """``model_config.<model>.mae_vit.params`` as ``build_model`` gets them: a value left null is the architecture's
    or the variant's (``_arch_values``). KeyError for a name that is no architecture."""
    sec = model_section(c)
    given = {k: v for k, v in sec["mae_vit"]["params"].items() if v is not None}
    return {**_arch_values(sec["mae_vit"]["arch"], c["model"]), **given}


def legacy_keys_set(cfg) -> list[str]:
    """Keys from the original that are accepted but have no effect, when set to a non-default value."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out = []
    for key, spec in FLAT_SCHEMA.items():
        if spec.legacy:
            v = _get(c, key)
            if v is not None and v != spec.default:
                out.append(key)
    return out


def schedule_warnings(cfg) -> list[str]:
    """Settings that run but are unlikely to be meant: a warm-up that does not end before the schedule does
    (a recipe shortened with training.max_update alone keeps its 12000 warm-up updates), a schedule longer or
    shorter than the run (T_max set apart from max_update)."""
    s, max_update = cfg["scheduler"]["params"], cfg["training"]["max_update"]
    out = []
    if s["use_warmup"] and s["warmup_iterations"] >= s["T_max"]:
        out.append(f"scheduler.params.warmup_iterations ({s['warmup_iterations']}) >= scheduler.params.T_max "
                   f"({s['T_max']}, training.max_update unless set): the lr warms up for the whole schedule "
                   f"and never decays; set scheduler.params.warmup_iterations below it (the recipes: 12000 of 144000 "
                   "updates on COCO, 12480 of 249600 on ImageNet)")
    elif s["warmup_iterations"] >= max_update and s["use_warmup"]:
        out.append(f"scheduler.params.warmup_iterations ({s['warmup_iterations']}) >= training.max_update "
                   f"({max_update}): the run ends before the lr reaches its base value")
    if s["T_max"] < max_update:
        out.append(f"scheduler.params.T_max ({s['T_max']}) < training.max_update ({max_update}): the last "
                   f"{max_update - s['T_max']} updates run at the final lr (eta_min = {s['eta_min']}); leave T_max "
                   "unset to follow training.max_update")
    elif s["T_max"] > max_update:
        out.append(f"scheduler.params.T_max ({s['T_max']}) > training.max_update ({max_update}): the run ends "
                   "before the cosine schedule does, above its final lr; leave T_max unset to follow "
                   "training.max_update")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------
def _get(tree, dotted):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


# The model and dataset of the config being loaded: suggestions for a key without its section name theirs
_PREFERRED: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar("_PREFERRED",
                                                                                         default=(None, None))


def _suggest(key: str) -> str:
    """Up to three keys the user may have meant: the same name in another section (training.lr:
    optimizer.params.lr), then keys that read alike, then names of the same words in another order (region_num:
    num_region). Keys of no effect are never offered, and of the sections every model and dataset repeat, only
    the one the key is in (else one)."""
    valid = [k for k, spec in FLAT_SCHEMA.items() if not spec.legacy]
    leaf = key.rsplit(".", 1)[-1]
    words = sorted(leaf.lower().split("_"))
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k != key]
    alike = difflib.get_close_matches(key, valid + sorted(_SECTIONS), n=6, cutoff=0.6)
    leaves: dict[str, list[str]] = {}
    for k in valid:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    alike_leaf = [k for name in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6) for k in leaves[name]]
    reordered = [k for k in valid if k.rsplit(".", 1)[-1] != leaf and sorted(k.rsplit(".", 1)[-1].split("_")) == words]
    section = re.match(r"(model_config\.\w+|dataset_config\.\w+)\.", key)
    renamed = []  # a shortened section name (dataset_config.coco.x): the same key in the sections it begins
    if section and not any(k.startswith(section.group(0)) for k in valid):
        parts = re.match(r"(\w+)\.(\w+)\.(.+)", key)  # (None for "dataset_config.coco.")
        if parts:
            group, name, rest = parts.groups()
            names = sorted({k.split(".")[1] for k in valid if k.startswith(group + ".")})
            renamed = [f"{group}.{n}.{rest}" for n in names if n.startswith(name) and f"{group}.{n}.{rest}" in FLAT_SCHEMA]
        section = None  # (every section's keys may be meant)
    out, seen = [], set()
    model, dataset = _PREFERRED.get()
    ours = tuple(f"{prefix}." for prefix in (f"model_config.{model}", f"dataset_config.{dataset}_pretrain"))

    def likeness(k):  # the run's own sections first, then by likeness
        return (not k.startswith(ours), -difflib.SequenceMatcher(None, key, k).ratio())

    for k in renamed:
        out.append(k)
        seen.add(re.sub(r"^(model_config|dataset_config)\.\w+\.", r"\1.*.", k))
    for k in sorted(same_leaf, key=likeness) + sorted(reordered, key=likeness) + alike + alike_leaf:
        if key.startswith(k + "."):
            continue  # (the section the key is in)
        repeated = re.match(r"(model_config\.\w+|dataset_config\.\w+)(\.|$)", k)
        if repeated and section and repeated.group(1) != section.group(1):
            continue  # another model's / dataset's section or copy of a key
        if repeated and not section and model and dataset and not (k + ".").startswith(ours):
            continue  # (a key without its section: the run's model's and dataset's sections only)
        generic = re.sub(r"^(model_config|dataset_config)\.\w+\.", r"\1.*.", k)
        if k in out or (repeated and not section and generic in seen):
            continue
        out.append(k)
        seen.add(generic)
    if any(k in FLAT_SCHEMA for k in out):  # sections only when no key fits
        out = [k for k in out if k in FLAT_SCHEMA]
    return f"; did you mean {' or '.join(out[:3])}?" if out else ""


def _check_key(key: str, where: str) -> None:
    if key in FLAT_SCHEMA:
        return
    parts = key.split(".")
    # Inside an opaque (legacy "any") value, anything goes.
    for i in range(1, len(parts)):
        spec = FLAT_SCHEMA.get(".".join(parts[:i]))
        if spec is not None and spec.kind == "any":
            return
    if key in _SECTIONS:
        return
    raise ConfigError(f"unknown config key {key!r} ({where}){_suggest(key)}")


def _normalize(tree: dict, where: str, prefix: str = "", unknown: list[str] | None = None) -> dict:
    """``tree`` with every key checked (ConfigError naming every unknown key); a section left null (``optimizer:``
    with nothing below it, every child commented out, or ``section=null``) becomes an empty mapping, which changes
    nothing when merged (as the original's ``optimizer: {}``). A section given a value that is not a mapping is an
    error. ``unknown``: where the nested calls collect the unknown keys."""
    if unknown is None:
        unknown = []
        out = _normalize(tree, where, prefix, unknown)
        _raise(unknown)
        return out
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if prefix == "" and k == "includes":
            out[k] = v
            continue
        if isinstance(k, str) and "." in k and not _opaque(key):  # `training.max_update: 7` in a file: nested
            head, rest = k.split(".", 1)  # (the key is checked below, as part of its section)
            out[head] = _merged_sections(out.get(head, {}), _normalize({rest: v}, where, f"{prefix}{head}.", unknown),
                                         f"{prefix}{head}", where)
            continue
        try:
            _check_key(key, where)
        except ConfigError as error:
            unknown.append(str(error))
            continue
        spec = FLAT_SCHEMA.get(key)
        if spec is not None:
            out[k] = v  # leaf (its value is checked after merging)
        elif isinstance(v, dict):
            out[k] = _merged_sections(out.get(k, {}), _normalize(v, where, key + ".", unknown), key, where)
        elif v is None:
            out[k] = {}
        else:
            child = next((c for c in sorted(FLAT_SCHEMA) if c.startswith(key + ".")), key + ".<key>")
            raise ConfigError(f"{key} must be a mapping (it is a section of keys such as {child}), got {v!r} "
                              f"({type(v).__name__}, {where})")
    return out


def _opaque(key: str) -> bool:
    """Whether ``key`` lies inside a value the schema leaves opaque (a legacy "any" key, whose contents are free)."""
    parts = key.split(".")
    return any((spec := FLAT_SCHEMA.get(".".join(parts[:i]))) is not None and spec.kind == "any"
               for i in range(1, len(parts)))


def _merged_sections(first: dict, second: dict, section: str, where: str) -> dict:
    """Two spellings of one section in a file (``training:`` and ``training.max_update:``) merged; a key that both
    set is an error naming it."""
    if not isinstance(first, dict) or not isinstance(second, dict):
        raise ConfigError(f"{section} is set twice in {where}")
    out = dict(first)
    for k, v in second.items():
        if k in out:
            out[k] = _merged_sections(out[k], v, f"{section}.{k}", where)
        else:
            out[k] = v
    return out


def _reads_as_scalar(text: str) -> bool:
    """Whether ``text`` would be a number or true/false unquoted."""
    if text.strip().lower() in ("true", "false"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_value(key: str, value: Any, spec: Spec) -> str | None:
    if spec.kind == "any":
        return None
    if value is None:
        return None if spec.nullable else f"{key} must not be null"
    kind = spec.kind
    bad = None
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            bad = "an integer"
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad = "a number"
    elif kind == "bool":
        if not isinstance(value, bool):
            bad = "true or false"
    elif kind == "str":
        if not isinstance(value, str):
            bad = "a string"
    elif kind == "floats":
        if not isinstance(value, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value):
            bad = "a list of numbers"
        elif spec.length is not None and len(value) != spec.length:
            bad = f"a list of {spec.length} numbers"
    elif kind == "strs":
        if isinstance(value, str):
            return None
        if not isinstance(value, list) or any(not isinstance(x, str) for x in value):
            bad = "a string or a list of strings"
    if bad is None and kind in ("float", "floats"):
        if not all(math.isfinite(x) for x in (value if kind == "floats" else [value])):
            bad = "a finite number" if kind == "float" else "a list of finite numbers"
    if bad:
        hint = ""
        if spec.choices is not None:  # (the allowed names, rather than "a string")
            bad = "one of " + ", ".join(map(repr, spec.choices))
            if isinstance(value, bool):
                hint = " (YAML reads true/false/yes/no/on/off as booleans)"
        elif kind in ("str", "strs") and isinstance(value, (bool, int, float)):
            hint = (" (a name that reads as a number or true/false must be quoted in a YAML file, e.g. "
                    f"{key.rsplit('.', 1)[-1]}: '0001')")
        elif kind in ("int", "float", "bool") and isinstance(value, str) and _reads_as_scalar(value):
            hint = (" (quoted: write it without quotes; an environment variable's value, ${oc.env:NAME}, is text, "
                    "which ${oc.decode:${oc.env:NAME}} reads as a number or true/false)")
        return f"{key} must be {bad}, got {value!r} ({type(value).__name__}){hint}"
    if spec.choices is not None and value not in spec.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}={value!r} is not one of {', '.join(map(repr, spec.choices))}{hint}"
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        return f"{key}={value!r} is not valid: use {spec.pattern_doc}"
    if spec.range is not None:
        items = value if kind == "floats" else [value]
        if any(x not in spec.range and x not in spec.special for x in items):
            allowed = " or ".join([*map(str, spec.special), str(spec.range)])
            return f"{key} must {'have each value' if kind == 'floats' else 'be'} {allowed}, got {value!r}"
    if spec.ordered and any(a > b for a, b in zip(value, value[1:])):
        return f"{key} must be ordered (low <= high), got {value!r}"
    return None


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)


def arch_defaults_comment(cfg) -> str:
    """YAML comment lines naming the values that the run's model takes from its architecture where
    ``model_config.<model>.mae_vit.params`` leaves them null (what ``--print-config`` shows as null)."""
    sec = model_section(cfg)
    params = sec["mae_vit"]["params"]
    values = _arch_values(sec["mae_vit"]["arch"], cfg["model"])
    taken = {k: values[k] for k, v in params.items() if v is None and k in values}
    if not taken:
        return ""
    items = [f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in taken.items()]
    lines = [""]
    for item in items:  # whole key: value pairs per line
        if lines[-1] and len(lines[-1]) + len(item) > 96:
            lines.append("")
        lines[-1] += (", " if lines[-1] else "") + item
    return (f"# model_config.{cfg['model']}.mae_vit.params left null take the values of "
            f"{sec['mae_vit']['arch']} / --model {cfg['model']}:\n" + "".join(f"#   {line}\n" for line in lines))
