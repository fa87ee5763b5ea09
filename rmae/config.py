"""Configuration: the original's key names, merged defaults <- ``includes:`` <- file <- command line.

A config file is read from a path, or by name from the package (``RMAE/COCO/rmae_fh_4000eps.yaml``; a leading
``config/`` or ``configs/`` as in the original's ``includes:`` is accepted). Every key is checked against
``SCHEMA``: an unknown key is an error that names the closest valid keys, and every value is type-checked.

``${scaled_lr:BASE}`` is ``BASE * training.batch_size / 256`` (the paper's rule), so overriding the batch size
rescales the learning rate of the shipped recipes.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

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
class Spec:
    kind: str  # int | float | bool | str | floats | strs | any
    default: Any = None
    nullable: bool = False
    choices: tuple | None = None
    length: int | None = None  # for floats
    doc: str = ""
    legacy: bool = False  # accepted for compatibility with the original's files, no effect here


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
    "mask_ratio": _f(0.75),
    "mae_vit": {
        "arch": _s("rmae_base_patch16"),
        "params": {
            "img_size": _i(None, nullable=True),
            "norm_pix_loss": _b(None, nullable=True),
            "use_mae_loss": _b(None, nullable=True),
            "num_region": _i(None, nullable=True),
            "mae_loss_weight": _f(None, nullable=True),
            "bg_loss_weight": _f(None, nullable=True),
            "region_loss_weight": _f(None, nullable=True),
            "region_mask_ratio": _f(None, nullable=True),
            "region_enc_dim": _i(None, nullable=True),
            "region_enc_depth": _i(None, nullable=True),
            "region_enc_num_heads": _i(None, nullable=True),
            "region_dec_dim": _i(None, nullable=True),
            "region_dec_depth": _i(None, nullable=True),
            "region_dec_num_heads": _i(None, nullable=True),
            "region_sample_type": _s(None, nullable=True, choices=("random", "random_fg")),
            "region_cross_layer": _i(None, nullable=True),
            "decoder_embed_dim": _i(None, nullable=True),
            "decoder_depth": _i(None, nullable=True),
            "decoder_num_heads": _i(None, nullable=True),
            "kernel_impl": _s(None, nullable=True, choices=("auto", "triton", "reference")),
        },
    },
    }


def _dataset_section(image_folder, mask_folder, anno_file, region_source):
    """``dataset_config.<dataset>_pretrain``; ``imdb_files.train`` decides the training folders (relative paths are
    under <data_dir>/coco/ or <data_dir>/imagenet/ (else imnet/), absolute ones as they are)."""
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
        "cache_bytes": _i(8 << 30, doc="shard sampler: per-rank bound on cached encoded bytes"),
        "filter_small_patches": _b(False),
        "label_resize": _s("center", choices=("center", "floor")),
        "crop_scale": Spec("floats", [0.2, 1.0], length=2),
        "crop_ratio": Spec("floats", [0.75, 4.0 / 3.0], length=2),
        "cache_mask": _legacy(),
        "imdb_files": {"train": split(*image_folder[0:1], *mask_folder[0:1], *anno_file[0:1]),
                       "val": split(*image_folder[1:2], *mask_folder[1:2], *anno_file[1:2])},
        "processors": _legacy(),
    }


SCHEMA: dict = {
    "includes": Spec("strs", [], nullable=True),
    "config": _s(None, nullable=True),
    "model": _s("rmae", choices=MODELS),
    "task": _s("pretrain", choices=TASKS),
    "dataset": _s("sample", choices=DATASETS),
    "training": {
        "max_update": _i(144000),
        "batch_size": _i(4096, doc="global batch (all ranks, all accumulation steps)"),
        "iter_per_update": _i(1),
        "use_fp16": _s("none", choices=("none", "float16", "bfloat16")),
        "use_compile": _b(None, nullable=True, doc="null: on for CUDA, off on CPU"),
        "max_norm": _f(0.0),
        "seed": _i(0),
        "log_interval": _i(200),
        "checkpoint_interval": _i(1000),
        "num_checkpoint": _i(2),
        "save_dir": _s(None, nullable=True, doc="run folder; null: runs/<experiment_name>"),
        "experiment_name": _s(None, nullable=True),
        "num_workers": _i(4),
        "pin_memory": _b(True),
        "tensorboard": _b(False),
        "tensorboard_logdir": _s(None, nullable=True),
        "resume": _b(True, doc="continue from the newest checkpoint in the run folder when there is one"),
        "resume_file": _s(None, nullable=True),
        "visualize_interval": _i(0, doc="0: only at the end"),
        "progress_bar": _b(True),
        "device": _s(None, nullable=True, doc="null: cuda when available, else cpu"),
        # Keys of the original's files that have no effect here.
        "trainer": _legacy(), "max_epoch": _legacy(), "run_type": _legacy(), "evaluation_interval": _legacy(),
        "find_unused_parameters": _legacy(), "iou_type": _legacy(), "logger_level": _legacy(),
        "log_format": _legacy(), "log_detailed_config": _legacy(), "should_not_log": _legacy(),
        "verbose_dump": _legacy(), "local_rank": _legacy(),
    },
    "model_config": {"mae": _model_section(), "rae": _model_section(), "rmae": _model_section()},
    "dataset_config": {
        "coco_pretrain": _dataset_section(
            [["image/train2017"], ["image/val2017"]], [["image/fh_train2017"], ["image/fh_val2017"]],
            [["annotations/instances_train2017.json"], ["annotations/instances_val2017.json"]], "offline"),
        "imnet_pretrain": _dataset_section([["train"], ["val"]], [["fh_train"], ["fh_val"]], [None, None], "offline"),
        "sample_pretrain": _dataset_section([None, None], [None, None], [None, None], "online"),
    },
    "optimizer": {
        "type": _s("adamw", choices=("adamw",)),
        "params": {
            "lr": _f("${scaled_lr:1.5e-4}", doc="1.5e-4 * training.batch_size / 256"),
            "weight_decay": _f(0.05),
            "wd_norm": _f(0.0),
            "wd_bias": _f(0.0),
            "eps": _f(1e-8),
            "betas": Spec("floats", [0.9, 0.95], length=2),
            "use_oss": _legacy(False),
        },
    },
    "scheduler": {
        "type": _s("cosine_annealing", choices=("cosine_annealing",)),
        "params": {
            "T_max": _i("${training.max_update}"),
            "eta_min": _f(0.0),
            "use_warmup": _b(True),
            "warmup_factor": _f(0.0),
            "warmup_iterations": _i(12000),
        },
    },
    "distributed": {
        "backend": _s(None, nullable=True, choices=("nccl", "gloo"), doc="null: nccl on GPU, gloo on CPU"),
        "init_method": _s(None, nullable=True),
        "port": _i(-1),
        "world_size": _i(None, nullable=True, doc="processes to spawn on one node; null: all visible GPUs"),
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
    return _scaled_lr(base, _root_.training.batch_size)


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


def find_config(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config path: as given, relative to the including file, or by name inside the package."""
    name = str(name)
    stripped = name
    for prefix in ("pretrain/config/", "config/", "configs/"):
        if stripped.startswith(prefix):
            stripped = stripped[len(prefix):]
    if relative_to is not None:  # an include: next to the including file, then the package, then the cwd
        candidates = [relative_to / name, CONFIG_ROOT / stripped, Path(name).expanduser()]
    else:
        candidates = [Path(name).expanduser(), CONFIG_ROOT / stripped]
    for c in candidates:
        if c.is_file():
            return c
    close = difflib.get_close_matches(stripped, shipped_configs(), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped configs: {', '.join(shipped_configs())}"
    raise ConfigError(f"config file {name!r} not found (as a path or in the package){hint}")


def _load_file(path: Path, seen: tuple = ()) -> DictConfig:
    """The file merged over its ``includes:`` (each include first merged over its own includes)."""
    if path in seen:
        raise ConfigError(f"config includes form a cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(cfg).__name__}")
    includes = cfg.pop("includes", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged = OmegaConf.create({})
    for inc in includes:
        merged = OmegaConf.merge(merged, _load_file(find_config(inc, relative_to=path.parent), seen + (path,)))
    return OmegaConf.merge(merged, cfg)


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for o in items:
        if "=" not in o:
            raise ConfigError(f"command-line override {o!r} is not of the form dotted.key=value")
        key = o.split("=", 1)[0].lstrip("+")
        _check_key(key, where="command line")
    return OmegaConf.from_dotlist([o.lstrip("+") for o in items])


def load_config(config: str | os.PathLike | None = None, overrides: Iterable[str] = (), *,
                model: str | None = None, task: str | None = None, dataset: str | None = None) -> DictConfig:
    """defaults <- includes <- file <- overrides (<- --model/--task/--dataset), validated and resolved."""
    cfg = OmegaConf.create(defaults())
    path = find_config(config if config is not None else DEFAULT_CONFIG)
    file_cfg = _load_file(path)
    _check_tree(OmegaConf.to_container(file_cfg, resolve=False), where=str(path))
    cfg = OmegaConf.merge(cfg, file_cfg)
    cfg = OmegaConf.merge(cfg, parse_overrides(overrides))
    cfg.config = str(path)
    for key, value in (("model", model), ("task", task), ("dataset", dataset)):
        if value is not None:
            cfg[key] = value
    return validate(cfg)


def validate(cfg: DictConfig) -> DictConfig:
    """Resolves interpolations and checks every key and value; returns a fresh, resolved config."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        raise ConfigError(f"cannot resolve config: {e}") from e
    _check_tree(container, where="config")
    errors = []
    for key, spec in FLAT_SCHEMA.items():
        value = _get(container, key)
        err = _check_value(key, value, spec)
        if err:
            errors.append(err)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    c = container
    tr = c["training"]
    for k in ("max_update", "batch_size", "iter_per_update", "log_interval", "checkpoint_interval"):
        if tr[k] is not None and tr[k] <= 0:
            errors.append(f"training.{k} must be > 0, got {tr[k]}")
    if tr["num_checkpoint"] < 1:
        errors.append(f"training.num_checkpoint must be >= 1, got {tr['num_checkpoint']}")
    if tr["batch_size"] % tr["iter_per_update"]:
        errors.append(f"training.batch_size ({tr['batch_size']}) must be divisible by training.iter_per_update "
                      f"({tr['iter_per_update']})")
    if tr["max_norm"] < 0:
        errors.append(f"training.max_norm must be >= 0 (0 = no clipping), got {tr['max_norm']}")
    sec = model_section(c)
    if sec["mae_vit"]["arch"] not in ARCHS and _arch_alias(sec["mae_vit"]["arch"]) not in ARCHS:
        close = difflib.get_close_matches(sec["mae_vit"]["arch"], ARCHS, n=2, cutoff=0.3)
        errors.append(f"model_config.{c['model']}.mae_vit.arch={sec['mae_vit']['arch']!r} is not an architecture "
                      f"(valid: {', '.join(ARCHS)}){'; did you mean ' + ' or '.join(close) + '?' if close else ''}")
    for k in ("mask_ratio",):
        if not 0.0 <= sec[k] < 1.0:
            errors.append(f"model_config.{c['model']}.{k} must be in [0, 1), got {sec[k]}")
    sp = c["scheduler"]["params"]
    if sp["warmup_iterations"] < 0 or sp["T_max"] <= 0:
        errors.append(f"scheduler.params: need warmup_iterations >= 0 and T_max > 0, got {sp['warmup_iterations']}, "
                      f"{sp['T_max']}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return OmegaConf.create(container)


def model_section(cfg) -> dict:
    """``model_config.<model>``: the section of the chosen model."""
    return cfg["model_config"][cfg["model"]]


def dataset_section(cfg) -> dict:
    return cfg["dataset_config"][f"{cfg['dataset']}_pretrain"]


def _arch_alias(arch: str) -> str:
    """The original's MAE configs name ``mae_base_patch16``; the same network is ``rmae_base_patch16``."""
    return "r" + arch if arch.startswith("mae_") else arch


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


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------
def _get(tree, dotted):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _suggest(key: str) -> str:
    valid = list(FLAT_SCHEMA) + sorted(_SECTIONS)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # same leaf name elsewhere, or a close leaf name under the same parent
        leaf = key.rsplit(".", 1)[-1]
        leaves = {}
        for v in FLAT_SCHEMA:
            leaves.setdefault(v.rsplit(".", 1)[-1], []).append(v)
        for name in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6):
            close.extend(leaves[name][:2])
        close = close[:3]
    return f"; did you mean {' or '.join(close)}?" if close else ""


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


def _check_tree(tree: dict, where: str, prefix: str = "") -> None:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if prefix == "" and k == "includes":
            continue
        _check_key(key, where)
        spec = FLAT_SCHEMA.get(key)
        if spec is not None:
            continue  # leaf (its value is checked after merging)
        if isinstance(v, dict):
            _check_tree(v, where, key + ".")
        elif v is not None:
            raise ConfigError(f"config key {key!r} ({where}) is a section and needs a mapping, got {v!r}")


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
    if bad:
        return f"{key} must be {bad}, got {value!r} ({type(value).__name__})"
    if spec.choices is not None and value not in spec.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}={value!r} is not one of {', '.join(map(repr, spec.choices))}{hint}"
    return None


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)
