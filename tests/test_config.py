"""Config system: shipped recipes parse and build, bad keys/values are rejected with close matches."""
import shutil
import warnings

import pytest
import torch

from rmae.config import CONFIG_ROOT, ConfigError, find_config, load_config, model_section, shipped_configs
from rmae.train import build_model_from_config, main

RECIPES = {
    "RMAE/COCO/rmae_fh_4000eps.yaml": ("rmae", "coco", 144000, 12000),
    "RMAE/COCO/rmae_fh_ccplus_4000eps.yaml": ("rmae", "coco", 144000, 12000),
    "RMAE/ImageNet/rmae_fh_800eps.yaml": ("rmae", "imnet", 249600, 12480),
    "MAE/COCO/mae_4000eps.yaml": ("mae", "coco", 144000, 12000),
    "MAE/ImageNet/mae_800eps.yaml": ("mae", "imnet", 249600, 12480),
}


def test_shipped_configs_present():
    names = set(shipped_configs())
    assert set(RECIPES) <= names
    assert {"default.yaml", "base.yaml", "official_models.yaml", "RMAE/base_rmae.yaml", "MAE/base_mae.yaml"} <= names


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_parses_and_builds(name):
    cfg = load_config(name)
    device = "cpu" if name == "default.yaml" else "meta"
    model = build_model_from_config(cfg, device)
    assert sum(p.numel() for p in model.parameters()) > 0
    if cfg.model == "rmae":
        assert model.num_region == 8  # region branch on (the original ships 0)
    if cfg.model == "mae":
        assert model.num_region == 0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_official_numbers(name):
    model, dataset, updates, warmup = RECIPES[name]
    cfg = load_config(name)
    assert (cfg.model, cfg.dataset) == (model, dataset)
    assert cfg.training.max_update == updates and cfg.training.batch_size == 4096
    assert cfg.scheduler.params.warmup_iterations == warmup and cfg.scheduler.params.T_max == updates
    p = cfg.optimizer.params
    assert p.lr == pytest.approx(2.4e-3) and list(p.betas) == [0.9, 0.95]
    assert p.weight_decay == 0.05 and p.wd_norm == 0.0 and p.wd_bias == 0.0
    assert cfg.scheduler.params.eta_min == 0.0 and cfg.scheduler.params.warmup_factor == 0.0
    sec = model_section(cfg)
    assert sec.mask_ratio == 0.75 and sec.mae_vit.params.norm_pix_loss is True


def test_lr_follows_batch_size_and_overrides_win():
    cfg = load_config("RMAE/COCO/rmae_fh_4000eps.yaml", ["training.batch_size=1024"])
    assert cfg.optimizer.params.lr == pytest.approx(1.5e-4 * 1024 / 256)
    cfg = load_config("RMAE/COCO/rmae_fh_4000eps.yaml", ["optimizer.params.lr=0.01", "training.max_update=10"])
    assert cfg.optimizer.params.lr == 0.01 and cfg.scheduler.params.T_max == 10


def test_cli_flags_select_model_and_dataset():
    cfg = load_config("RMAE/COCO/rmae_fh_4000eps.yaml", model="mae", dataset="sample")
    assert cfg.model == "mae" and cfg.dataset == "sample"


def test_includes_with_original_prefix(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("includes:\n  - config/RMAE/base_rmae.yaml\ntraining:\n  max_update: 7\n")
    cfg = load_config(str(f))
    assert cfg.training.max_update == 7 and cfg.training.batch_size == 4096
    assert find_config("configs/MAE/base_mae.yaml").name == "base_mae.yaml"


@pytest.mark.parametrize("override, expected", [
    ("training.max_updat=3", "did you mean training.max_update or"),
    ("trainng.seed=1", "did you mean training.seed or"),
    ("model_config.rmae.mae_vit.params.num_regions=3", "did you mean model_config.rmae.mae_vit.params.num_region or"),
    ("optimizer.params.weight_decy=0.1", "did you mean optimizer.params.weight_decay or"),
    ("training.lr=0.1", "did you mean optimizer.params.lr or"),  # the same name in another section first
    ("model_config.rmae.mae_vit.params.region_num=4", "did you mean model_config.rmae.mae_vit.params.num_region or"),
    ("model_config.rmea.mask_ratio=0.5", "did you mean model_config.rmae.mask_ratio or"),
    ("dataset_config.coco.data_dir=/x", "did you mean dataset_config.coco_pretrain.data_dir or"),  # a short name
    ("dataset_config.imnet.sampler=shard", "did you mean dataset_config.imnet_pretrain.sampler?"),
    ("dataset_config.coco.=1", "unknown config key 'dataset_config.coco.'"),  # (no name after the dot)
])
def test_unknown_keys_name_close_matches(override, expected):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(None, [override])
    assert expected in str(e.value)
    # never a key of no effect (training.max_epoch), never another model's copy of a key of the user's model
    assert "max_epoch" not in str(e.value) and "model_config.rae." not in str(e.value)
    assert "or training?" not in str(e.value) and "or training or" not in str(e.value)  # (the key's own section)


def test_every_unknown_key_of_a_file_is_named_at_once(tmp_path):
    """A file (or a command line) with several misspelt keys: all are named in one error (only the first was, so
    each fix found the next)."""
    (tmp_path / "bad.yaml").write_text("training:\n  max_updates: 3\n  seed: 1\noptimizer:\n  params:\n    lr_rate: 1\n")
    with pytest.raises(ConfigError, match=r"invalid config:\n  unknown config key 'training.max_updates' \(\S*bad.yaml\); "
                                          r"did you mean training.max_update.*\n  unknown config key "
                                          r"'optimizer.params.lr_rate' \(\S*bad.yaml\); did you mean optimizer.params.lr"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match=r"invalid config:\n  unknown config key 'training.max_updates' \(command line\).*"
                                          r"\n  unknown config key 'optimizer.params.lr_rate' \(command line\)"):
        load_config(None, ["training.max_updates=3", "training.seed=1", "optimizer.params.lr_rate=1"])


def test_config_given_twice_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "MAE/COCO/mae_4000eps.yaml", "--config", "RMAE/COCO/rmae_fh_4000eps.yaml", "--print-config"])
    assert exit_info.value.code == 2 and "--config given twice" in capsys.readouterr().err


def test_imagenet_is_imnet_everywhere():
    assert load_config(None, ["dataset=imagenet"]).dataset == "imnet"
    assert load_config(None, dataset="imagenet").dataset == "imnet"


def test_a_key_without_its_section_is_suggested_in_the_runs_model_and_dataset():
    for args, expected in ((dict(), "did you mean model_config.rmae.mask_ratio or"),
                           (dict(model="mae"), "did you mean model_config.mae.mask_ratio or")):
        with pytest.raises(ConfigError) as e:
            load_config(None, ["mask_ratio=0.5"], **args)
        assert expected in str(e.value) and "model_config.rae" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean dataset_config.coco_pretrain.sampler"):
        load_config(None, ["dataset=coco", "sampler=shard"])
    with pytest.raises(ConfigError, match="did you mean dataset_config.imnet_pretrain.sampler"):  # (the alias)
        load_config(None, ["dataset=imagenet", "sampler=shard"])
    with pytest.raises(ConfigError, match="did you mean model_config.mae.mask_ratio or"):  # (quoted, as YAML reads it)
        load_config(None, ["model='mae'", "mask_ratio=0.5"])


def test_a_config_file_given_as_an_override_is_pointed_to_config(tmp_path):
    (tmp_path / "mine.yaml").write_text("training:\n  max_update: 3\n")
    with pytest.raises(ConfigError, match=f"to read a config file, give it with --config {tmp_path / 'mine.yaml'}"):
        load_config(None, [str(tmp_path / "mine.yaml")])


@pytest.mark.parametrize("override, fragment", [
    ("training.use_fp16=fp16", "did you mean 'float16'"),
    ("training.batch_size=abc", "must be an integer"),
    ("training.use_compile=maybe", "true or false"),
    ("optimizer.params.betas=[0.9]", "list of 2 numbers"),
    ("model_config.rmae.mae_vit.arch=rmae_tiny_patch61", "did you mean rmae_tiny_patch16"),
    ("training.iter_per_update=3", "divisible"),
    ("dataset=cocoa", "did you mean 'coco'"),
])
def test_bad_values_rejected(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_bad_key_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("training:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match="training.batch_size"):
        load_config(str(f))


def test_dotted_keys_in_a_file_set_their_nested_keys(tmp_path):
    """``training.max_update: 7`` in a file is the key it names (it was kept as a literal top-level key that nothing
    read: the run silently trained 300 updates), also beside the same section spelled as a mapping; one key set
    in both spellings, and an unknown dotted key, are errors naming them."""
    f = tmp_path / "flat.yaml"
    f.write_text("includes: [default.yaml]\ntraining.max_update: 7\nmodel_config.rmae.mask_ratio: 0.5\n"
                 "training:\n  seed: 3\n")
    cfg = load_config(str(f))
    assert cfg.training.max_update == 7 and cfg.training.seed == 3 and model_section(cfg)["mask_ratio"] == 0.5
    assert "training.max_update" not in cfg
    f.write_text("training.max_update: 7\ntraining:\n  max_update: 3\n")
    with pytest.raises(ConfigError, match=r"training\.max_update is set twice in \S*flat\.yaml"):
        load_config(str(f))
    f.write_text("training.max_updat: 7\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'training\.max_updat' .*training\.max_update"):
        load_config(str(f))


def test_home_folder_in_path_settings_is_expanded(tmp_path, monkeypatch, capsys):
    """``training.save_dir=~/x`` (which the shell leaves alone after ``=``) is the home folder's x, not a folder
    named ``~`` in the current one; a run folder that is a file is a clear error."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["training.save_dir=~/x", "training.resume_file=~/r.pt", "dataset=coco",
                             "dataset_config.coco_pretrain.imdb_files.train.image_folder=[~/a,b]"])
    assert cfg.training.save_dir == str(tmp_path / "x") and cfg.training.resume_file == str(tmp_path / "r.pt")
    assert list(cfg.dataset_config.coco_pretrain.imdb_files.train.image_folder) == [str(tmp_path / "a"), "b"]
    (tmp_path / "afile").write_text("x")
    assert main([f"training.save_dir={tmp_path / 'afile'}", "training.max_update=1"]) == 2
    assert f"the run folder {tmp_path / 'afile'} (training.save_dir) is a file, not a folder" in capsys.readouterr().err


def test_an_environment_variable_for_a_number_points_to_oc_decode(monkeypatch, tmp_path):
    """${oc.env:NAME} is text: the error for a number key says how to read it as one, which then works."""
    monkeypatch.setenv("MAXU", "7")
    with pytest.raises(ConfigError, match=r"max_update must be an integer, got '7' \(str\) \(quoted: .*"
                                          r"\$\{oc\.decode:\$\{oc\.env:NAME\}\}"):
        load_config(None, ["training.max_update=${oc.env:MAXU}"])
    assert load_config(None, ["training.max_update=${oc.decode:${oc.env:MAXU}}"]).training.max_update == 7
    # text that is no number gets no such hint; a name of a fixed list says the names, also for true/false
    with pytest.raises(ConfigError, match=r"batch_size must be an integer, got 'abc' \(str\)$"):
        load_config(None, ["training.batch_size=abc"])
    (tmp_path / "fp16.yaml").write_text("training:\n  use_fp16: true\n")
    with pytest.raises(ConfigError, match=r"use_fp16 must be one of 'none', 'float16', 'bfloat16', got True \(bool\) "
                                          r"\(YAML reads true/false/yes/no/on/off as booleans\)$"):
        load_config(str(tmp_path / "fp16.yaml"), [])


def test_missing_config_suggests():
    with pytest.raises(ConfigError, match="rmae_fh_4000eps"):
        load_config("RMAE/COCO/rmae_fh_400eps.yaml")


def test_cli_reports_config_errors(capsys):
    assert main(["training.max_updat=3"]) == 2
    assert "training.max_update" in capsys.readouterr().err


def test_print_config(capsys, tmp_path):
    assert main(["--config", "MAE/COCO/mae_4000eps.yaml", "--print-config"]) == 0
    assert "max_update: 144000" in capsys.readouterr().out
    # the values a null model key takes from the architecture, as comments (the config itself unchanged: it reads
    # back as the same config)
    assert main(["--config", "RMAE/COCO/rmae_fh_4000eps.yaml", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "# model_config.rmae.mae_vit.params left null take the values of rmae_base_patch16 / --model rmae:" in out
    assert "decoder_embed_dim: 512" in out and "region_cross_layer: 8" in out
    # the settings computed from others, with their formulas (a copy keeps only the numbers)
    formulas = ("# computed from other settings (a copy of this config keeps the values above; write the formula to "
                "keep the rule):\n#   optimizer.params.lr: ${scaled_lr:1.5e-4}\n"
                "#   scheduler.params.T_max: ${training.max_update}\n")
    assert out.endswith(formulas + "\n") and "lr: 0.0024" in out  # (print's line end after it)
    (tmp_path / "printed.yaml").write_text(out)
    assert main(["--config", str(tmp_path / "printed.yaml"), "--print-config"]) == 0
    again = capsys.readouterr().out
    assert again.replace(str(tmp_path / "printed.yaml"), "X") == out[:-len(formulas) - 1].replace(
        str(load_config("RMAE/COCO/rmae_fh_4000eps.yaml").config), "X") + "\n"
    assert main(["--config", "RMAE/COCO/rmae_fh_4000eps.yaml", "optimizer.params.lr=1e-3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "optimizer.params.lr:" not in out and "#   scheduler.params.T_max: ${training.max_update}" in out


def test_meta_build_of_huge():
    cfg = load_config("RMAE/COCO/rmae_fh_4000eps.yaml", ["model_config.rmae.mae_vit.arch=rmae_huge_patch14"])
    model = build_model_from_config(cfg, "meta")
    assert next(model.parameters()).device == torch.device("meta")
    assert model.patch_size == 14


# ---------------------------------------------------------------------------------------------------------------
# Bad settings are errors at config time: a message naming the key, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------------------------
def run_main(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_iter_per_update_zero_is_a_message(capsys):
    rc, err = run_main(capsys, "--print-config", "training.iter_per_update=0")
    assert rc == 2 and "error: training.iter_per_update must be > 0, got 0" in err


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("value, fragment", [("abc", "must be an integer"), ("[32]", "must be an integer"),
                                             ("null", "must not be null")])
def test_batch_size_type_named_before_the_lr_interpolation(name, value, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(name, [f"training.batch_size={value}"])
    assert f"training.batch_size {fragment}" in str(e.value)
    assert "optimizer.params.lr" not in str(e.value) and "interpolation" not in str(e.value)


def test_interpolated_batch_size_named_by_the_lr_resolver():
    with pytest.raises(ConfigError) as e:
        load_config("RMAE/COCO/rmae_fh_4000eps.yaml",
                    ["training.use_fp16=bfloat16", "training.batch_size=${training.use_fp16}"])
    assert "training.batch_size must be an integer" in str(e.value) and "bfloat16" in str(e.value)


def test_section_given_a_value_must_be_a_mapping(tmp_path, capsys):
    with pytest.raises(ConfigError, match="training must be a mapping"):
        load_config("RMAE/COCO/rmae_fh_4000eps.yaml", ["training=5"])
    f = tmp_path / "sec.yaml"
    f.write_text("includes: [base.yaml]\noptimizer:\n  params: 0.1\n")
    with pytest.raises(ConfigError, match="optimizer.params must be a mapping"):
        load_config(str(f))
    rc, err = run_main(capsys, "--print-config", "training=5")
    assert rc == 2 and "error: training must be a mapping" in err


def test_empty_sections_change_nothing(tmp_path):
    """The original's files hold empty sections (its default.yaml: ``optimizer: {}``, ``model_config: {}``); a
    section left null (nothing below it, every child commented out, ``section=null``) means the same: no change.
    It never wipes the inherited values (it did: lr, betas... gone, or ``params: null`` crashing the build)."""
    ref = load_config("RMAE/COCO/rmae_fh_4000eps.yaml")
    f = tmp_path / "empty_sections.yaml"
    f.write_text("includes: [RMAE/COCO/rmae_fh_4000eps.yaml]\noptimizer:\nscheduler: {}\ntraining:\n"
                 "model_config:\n  rmae:\n    mae_vit:\n      params:\n      #  num_region: 4\n")
    for cfg in (load_config(str(f)),
                load_config("RMAE/COCO/rmae_fh_4000eps.yaml", ["model_config.rmae.mae_vit.params=null",
                                                               "optimizer=null", "scheduler.params=null"])):
        for section in ("optimizer", "scheduler", "training", "model_config"):
            assert cfg[section] == ref[section]
        assert build_model_from_config(cfg, "meta").num_region == 8


@pytest.mark.parametrize("override, fragment", [
    ("model_config.rmae.mask_ratio=0", "model_config.rmae.mask_ratio must be in (0, 1), got 0"),
    ("model_config.rmae.mask_ratio=1.0", "model_config.rmae.mask_ratio must be in (0, 1)"),
    ("model_config.rmae.mask_ratio=0.99", "model_config.rmae.mask_ratio=0.99 leaves 0 of the 49 patches"),
    ("model_config.rmae.mae_vit.params.region_mask_ratio=0", "region_mask_ratio must be in (0, 1)"),
    ("model_config.rmae.mae_vit.params.region_mask_ratio=1.5", "region_mask_ratio must be in (0, 1)"),
    ("model_config.rmae.mae_vit.params.img_size=0", "img_size must be > 0"),
    ("model_config.rmae.mae_vit.params.img_size=100", "img_size must be a multiple of the patch size 16"),
    ("model_config.rmae.mae_vit.params.num_region=-3", "num_region must be >= 0"),
    ("model_config.rmae.mae_vit.params.region_enc_num_heads=0", "region_enc_num_heads must be >= 1"),
    ("model_config.rmae.mae_vit.params.region_enc_num_heads=5", "region_enc_num_heads (5) must divide"),
    ("model_config.rmae.mae_vit.params.decoder_num_heads=7", "decoder_num_heads (7) must divide "
                                                             "model_config.rmae.mae_vit.params.decoder_embed_dim (128"),
    ("model_config.rmae.mae_vit.params.region_enc_dim=-128", "region_enc_dim must be > 0"),
    ("model_config.rmae.mae_vit.params.region_dec_dim=66", "region_dec_dim (66) must be a multiple of 4"),
    ("model_config.rmae.mae_vit.params.region_dec_depth=0", "region_dec_depth must be >= 1"),
    ("model_config.rmae.mae_vit.params.decoder_depth=-1", "decoder_depth must be >= 0"),
    ("model_config.rmae.mae_vit.params.mae_loss_weight=-1", "mae_loss_weight must be >= 0"),
    ("model_config.rmae.mae_vit.params.use_mae_loss=false", None),  # R-MAE without pixels = RAE: allowed
    ("optimizer.params.lr=-1", "optimizer.params.lr must be > 0"),
    ("optimizer.params.lr=0", "optimizer.params.lr must be > 0"),  # (the schedule divided by it)
    ("optimizer.params.lr=.nan", "optimizer.params.lr must be a finite number"),
    ("optimizer.params.eps=0", "optimizer.params.eps must be > 0"),  # (AdamW then gives NaN weights)
    ("optimizer.params.weight_decay=-0.05", "optimizer.params.weight_decay must be >= 0"),
    ("optimizer.params.wd_norm=-1", "optimizer.params.wd_norm must be >= 0"),
    ("optimizer.params.betas=[0.9,1.0]", "optimizer.params.betas must have each value in [0, 1)"),
    ("optimizer.params.betas=[-0.1,0.9]", "optimizer.params.betas must have each value in [0, 1)"),
    ("scheduler.params.eta_min=-0.001", "scheduler.params.eta_min must be >= 0"),
    ("scheduler.params.eta_min=1", "scheduler.params.eta_min (1) must not exceed optimizer.params.lr (0.0015)"),
    ("scheduler.params.warmup_factor=2", "scheduler.params.warmup_factor must be in [0, 1]"),
    ("scheduler.params.warmup_iterations=-1", "scheduler.params.warmup_iterations must be >= 0"),
    ("scheduler.params.T_max=0", "scheduler.params.T_max must be > 0"),
    ("training.num_workers=-1", "training.num_workers must be >= 0"),
    ("training.visualize_interval=-5", "training.visualize_interval must be >= 0"),
    ("training.log_interval=-10", "training.log_interval must be > 0"),
    ("training.checkpoint_interval=0", "training.checkpoint_interval must be > 0"),
    ("training.max_norm=-1", "training.max_norm must be >= 0"),
    ("training.seed=-2", "training.seed must be -1 or in [0, 4294967296), got -2"),
    ("distributed.world_size=0", "distributed.world_size must be >= 1"),
    ("distributed.port=0", "distributed.port must be -1 or in [1, 65535]"),
    ("distributed.port=70000", "distributed.port must be -1 or in [1, 65535]"),
    ("dataset_config.coco_pretrain.cache_bytes=-1", "dataset_config.coco_pretrain.cache_bytes must be >= 0"),
    ("dataset_config.sample_pretrain.crop_scale=[0.5,0.2]", "crop_scale must be ordered (low <= high)"),
    ("dataset_config.sample_pretrain.crop_scale=[0,1]", "crop_scale must have each value in (0, 1]"),
    ("dataset_config.sample_pretrain.crop_ratio=[1.5,0.75]", "crop_ratio must be ordered"),
    ("dataset_config.sample_pretrain.crop_ratio=[-1,1]", "crop_ratio must have each value > 0"),
])
def test_ranges_checked_at_config_time(override, fragment):
    if fragment is None:
        cfg = load_config(None, [override])
        build_model_from_config(cfg, "meta")
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_model_variant_rules_at_config_time():
    with pytest.raises(ConfigError, match="num_region must be 0 for --model mae"):
        load_config(None, ["model_config.mae.mae_vit.params.num_region=3"], model="mae")
    with pytest.raises(ConfigError, match="use_mae_loss must be false for --model rae"):
        load_config(None, ["model_config.rae.mae_vit.params.use_mae_loss=true"], model="rae")
    with pytest.raises(ConfigError, match="the model has no loss"):
        load_config(None, ["model_config.rmae.mae_vit.params.use_mae_loss=false",
                           "model_config.rmae.mae_vit.params.num_region=0"])
    # the original's base_rmae.yaml has num_region: 0, and its R-MAE runs trained MAE: refused, not copied
    with pytest.raises(ConfigError, match="num_region is 0: --model rmae without regions would train plain MAE"):
        load_config("RMAE/COCO/rmae_fh_4000eps.yaml", ["model_config.rmae.mae_vit.params.num_region=0"])
    with pytest.raises(ConfigError, match="the model has no loss"):
        load_config(None, ["model_config.rae.mae_vit.params.num_region=0"], model="rae")


def test_launch_settings_checked_before_any_rank_starts(monkeypatch, capsys):
    """Settings that depend on the rank count or the device, and folder lists that do not pair up: 'error:', exit 2,
    once, before spawning or writing anything."""
    from rmae import kernels
    from rmae.train import main

    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # as outside the tests
    for overrides, fragment in [
        (["training.batch_size=32", "distributed.world_size=3", "training.device=cpu"],
         "training.batch_size (32) must be divisible by training.iter_per_update x ranks (1 x 3)"),
        (["distributed.world_size=2", "distributed.backend=nccl", "training.device=cpu"],
         "distributed.backend=nccl needs CUDA devices; these 2 ranks run on the CPU"),
        (["training.device=cpu", "model_config.rmae.mae_vit.params.kernel_impl=triton"],
         "kernel_impl=triton needs a CUDA device"),
        (["dataset_config.sample_pretrain.imdb_files.train.image_folder=[x]"], "the sample set has no folders"),
        (["--dataset", "coco", "dataset_config.coco_pretrain.imdb_files.train.mask_folder=[a,b]"],
         "mask_folder has 2 entries but dataset_config.coco_pretrain.imdb_files.train.image_folder has 1"),
    ]:
        assert main(["training.max_update=1", "training.save_dir=/nonexistent/never_written", *overrides]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and fragment in err and "Traceback" not in err, err


def test_every_range_is_declared():
    """Every number of the schema has a range (legacy keys, which have no effect, aside)."""
    from rmae.config import FLAT_SCHEMA

    missing = [k for k, s in FLAT_SCHEMA.items() if s.kind in ("int", "float", "floats") and s.range is None]
    assert missing == []


def test_main_reports_a_model_or_optimizer_value_error(tmp_path, monkeypatch, capsys):
    """Backstop: a ValueError of the model or optimizer build is a message (exit 2) before any file is written."""
    import rmae.train as rt

    def refuse(*a, **k):
        raise ValueError("this model cannot be built")

    run = tmp_path / "run"
    monkeypatch.setattr(rt, "build_model_from_config", refuse)
    rc, err = run_main(capsys, f"training.save_dir={run}", "training.device=cpu")
    assert rc == 2 and "error: this model cannot be built" in err and not run.exists()
    monkeypatch.undo()
    monkeypatch.setattr(rt, "build_optimizer", refuse)
    rc, err = run_main(capsys, f"training.save_dir={run}", "training.device=cpu")
    assert rc == 2 and "error: this model cannot be built" in err and not run.exists()


# ---------------------------------------------------------------------------------------------------------------
# The original's files and keys
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_configs_set_no_legacy_keys(name):
    """No run of a shipped config warns "accepted for compatibility ... but has no effect"."""
    from rmae.config import legacy_keys_set

    assert legacy_keys_set(load_config(name)) == []


ORIGINAL_MAE_COCO = """includes:
  - config/MAE/base_mae.yaml

dataset_config:
  coco_pretrain:
    cache_mode: false
    sampler: infinite
    filter_small_patches: false
    imdb_files:
      train:
        image_folder:
          - image/train2017
      val:
        image_folder:
          - image/val2017
    processors:
      image_test_processor:
        type: compose
        params:
          preprocessors:
            - type: to_tensor
              params: {}

training:
  run_type: train_val
  evaluation_interval: 50
  checkpoint_interval: 10
"""


def test_original_files_keys_accepted_and_reported(tmp_path):
    """The original's MAE recipes set ``cache_mode`` and ``imdb_files.val``: accepted, reported as no-effect."""
    from rmae.config import legacy_keys_set

    f = tmp_path / "mae_4000eps.yaml"
    f.write_text(ORIGINAL_MAE_COCO)
    cfg = load_config(str(f), model="mae", dataset="coco")
    assert cfg.training.checkpoint_interval == 10 and cfg.model_config.mae.mae_vit.params.decoder_depth == 8
    legacy = legacy_keys_set(cfg)
    assert {"dataset_config.coco_pretrain.cache_mode", "dataset_config.coco_pretrain.imdb_files.val"} <= set(legacy)
    cfg = load_config(None, ["dataset_config.imnet_pretrain.imdb_files.val.image_folder=val"])
    assert legacy_keys_set(cfg) == ["dataset_config.imnet_pretrain.imdb_files.val"]


def test_include_prefers_the_users_file(tmp_path, monkeypatch, capsys):
    """An include written as a path (the original's ``config/MAE/base_mae.yaml``) is the user's file at that path -
    next to the including file, else from the current directory - before the package's copy, which is used (and
    named on stderr) only when there is none."""
    mine = tmp_path / "recipes" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("includes:\n  - config/MAE/base_mae.yaml\ntraining:\n  log_interval: 3\n")
    cwd_copy = tmp_path / "config" / "MAE" / "base_mae.yaml"
    cwd_copy.parent.mkdir(parents=True)
    cwd_copy.write_text("includes: [base.yaml]\nmodel: mae\ntraining:\n  max_update: 5\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    cfg = load_config(str(mine))
    assert (cfg.model, cfg.training.max_update, cfg.training.log_interval) == ("mae", 5, 3)
    err = capsys.readouterr().err
    assert str(find_config("MAE/base_mae.yaml")) not in err and str(find_config("base.yaml")) in err  # its include
    beside = mine.parent / "config" / "MAE" / "base_mae.yaml"
    beside.parent.mkdir(parents=True)
    beside.write_text("includes: [base.yaml]\nmodel: mae\ntraining:\n  max_update: 6\n")
    assert load_config(str(mine)).training.max_update == 6
    shutil.rmtree(tmp_path / "config")
    shutil.rmtree(mine.parent / "config")
    cfg = load_config(str(mine))
    assert cfg.model == "mae" and cfg.training.max_update == 144000  # the package's MAE/base_mae.yaml
    err = capsys.readouterr().err
    assert "config/MAE/base_mae.yaml" in err and str(find_config("MAE/base_mae.yaml")) in err


def test_shipped_includes_ignore_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "MAE").mkdir()
    (tmp_path / "MAE" / "base_mae.yaml").write_text("training:\n  max_update: 5\n")
    (tmp_path / "base.yaml").write_text("training:\n  batch_size: 8\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("MAE/COCO/mae_4000eps.yaml")
    assert cfg.training.max_update == 144000 and cfg.training.batch_size == 4096


@pytest.mark.parametrize("override", ["includes=[MAE/base_mae.yaml]", "config=MAE/COCO/mae_4000eps.yaml",
                                      "+includes=[base.yaml]"])
def test_includes_and_config_refused_on_the_command_line(override):
    with pytest.raises(ConfigError, match="cannot be set on the command line; give the config file with --config FILE"):
        load_config(None, [override])


@pytest.mark.parametrize("device, ok", [(None, True), ("cpu", True), ("cuda", True), ("cuda:1", True),
                                        ("gpu0", False), ("cuda:x", False), ("cuda1", False), ("CPU", False)])
def test_device_values(device, ok):
    override = [f"training.device={'null' if device is None else device}"]
    if ok:
        assert load_config(None, override).training.device == device
    else:
        with pytest.raises(ConfigError, match="training.device=.* is not valid: use cpu, cuda, cuda:N"):
            load_config(None, override)


def test_device_must_exist(monkeypatch, capsys):
    from rmae import distributed as rdist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            rdist.check_device(device)
        rc, err = run_main(capsys, f"training.device={device}")
        assert rc == 2 and "error: training.device=" in err and "CUDA is not available" in err
    assert rdist.check_device("cpu") is None and rdist.check_device(None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rdist.check_device("cuda") is None and rdist.check_device("cuda:1") == 1
    with pytest.raises(ConfigError, match=r"'cuda:2' but 2 CUDA device\(s\) are visible"):
        rdist.check_device("cuda:2")
    with pytest.raises(ConfigError, match="names one GPU but the run has 2 processes"):
        rdist.check_device("cuda:1", world_size=2)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    # cuda:N is one process on GPU N (a plain launch on a node of several GPUs would spawn one per GPU)
    assert rdist.resolve_launch({"world_size": None, "no_spawn": False}, "cuda:1") == 0
    assert rdist.resolve_launch({"world_size": None, "no_spawn": False}, "cuda") == 2
    with pytest.raises(ConfigError, match="names one GPU"):
        rdist.resolve_launch({"world_size": 2, "no_spawn": False}, "cuda:1")


def test_idle_gpus_of_a_node_are_warned_about():
    """GPUs that a host's ranks see but none uses: the first rank of that host says how many (one process on a
    node of 8 GPUs; tasks given two GPUs each). One rank per GPU, shared or own visibility, is no warning."""
    from rmae import distributed as rdist

    gpus = [f"GPU-{i}" for i in range(8)]
    one_task = [("a", gpus[:2], gpus[0]), ("a", gpus[:2], gpus[1]), ("b", gpus, gpus[0])]
    with pytest.warns(UserWarning, match="b: 7 of the 8 GPUs its 1 rank\\(s\\) see stay idle"):
        rdist.warn_of_idle_gpus(2, one_task)
    two_each = [("a", gpus[2 * r:2 * r + 2], gpus[2 * r]) for r in range(4)]
    with pytest.warns(UserWarning, match="a: 4 of the 8 GPUs its 4 rank\\(s\\) see stay idle"):
        rdist.warn_of_idle_gpus(0, two_each)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rdist.warn_of_idle_gpus(1, one_task)  # not the first rank of its host
        rdist.warn_of_idle_gpus(1, two_each)
        for rank in range(8):
            rdist.warn_of_idle_gpus(rank, [("a", gpus, gpus[r]) for r in range(8)])  # torchrun: all see all
            rdist.warn_of_idle_gpus(rank, [("a", [gpus[r]], gpus[r]) for r in range(8)])  # --gpus-per-task=1
        rdist.warn_of_idle_gpus(0, [("a", gpus, gpus[0])])  # one process alone (training.device=cuda)


def test_config_directory_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config("RMAE")
    for text in ("", "# nothing but a comment\n"):
        f = tmp_path / "empty.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError, match=f"config file {f} is empty"):
            load_config(str(f))
    inc = tmp_path / "inc.yaml"
    inc.write_text("includes: [empty.yaml]\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(str(inc))


def test_demo_lr_is_fixed_recipes_scale():
    """README: the recipes' lr is 1.5e-4 x batch/256; the demo (default.yaml) fixes 1.5e-3 whatever the batch."""
    assert load_config(None).optimizer.params.lr == load_config(None, ["training.batch_size=64"]).optimizer.params.lr \
        == pytest.approx(1.5e-3)
    for name in RECIPES:
        assert load_config(name, ["training.batch_size=512"]).optimizer.params.lr == pytest.approx(1.5e-4 * 2)


@pytest.mark.parametrize("text", ["0001", "2024", "1e3", "true", "0x10", "007.5"])
def test_text_settings_keep_their_text_on_the_command_line(text):
    """YAML reads 0001 as the number 1: a run folder or experiment name written so on the command line is that
    text, not a number (it was mangled, then refused as not a string)."""
    cfg = load_config(None, [f"training.save_dir=runs/x/../{text}", f"training.experiment_name={text}",
                             f"dataset_config.coco_pretrain.imdb_files.train.image_folder={text}"])
    assert cfg.training.experiment_name == text and cfg.training.save_dir == f"runs/x/../{text}"
    assert cfg.dataset_config.coco_pretrain.imdb_files.train.image_folder == text
    assert load_config(None, [f"training.save_dir={text}"]).training.save_dir == text
    # null, quotes, lists and interpolations keep their meaning; numbers stay numbers
    cfg = load_config(None, ["training.save_dir=null", "training.experiment_name='0002'", "training.seed=12",
                             "dataset_config.coco_pretrain.imdb_files.train.image_folder=[a,'01']"])
    assert cfg.training.save_dir is None and cfg.training.experiment_name == "0002" and cfg.training.seed == 12
    assert list(cfg.dataset_config.coco_pretrain.imdb_files.train.image_folder) == ["a", "01"]


def test_the_last_override_of_a_text_setting_wins():
    """save_dir=0001 then save_dir=null: the later null stands (the kept text of the earlier one won); every YAML
    spelling of null is null; a later section override replaces the text set inside it."""
    for null in ("null", "Null", "NULL", "~"):
        cfg = load_config(None, ["training.save_dir=0001", f"training.save_dir={null}"])
        assert cfg.training.save_dir is None, null
        assert load_config(None, [f"training.experiment_name={null}"]).training.experiment_name is None
    assert load_config(None, ["training.experiment_name=0001", "training.experiment_name='7'"]
                       ).training.experiment_name == "7"
    assert load_config(None, ["training.experiment_name=a", "training.experiment_name=0002"]
                       ).training.experiment_name == "0002"
    cfg = load_config(None, ["training.experiment_name=0001", "training={experiment_name: b}"])
    assert cfg.training.experiment_name == "b"
    # a mapping merges into its section: the text set before it, and not named in it, stays text
    cfg = load_config(None, ["training.save_dir=0001", "training={max_update: 3}"])
    assert cfg.training.save_dir == "0001" and cfg.training.max_update == 3
    cfg = load_config(None, ["dataset_config.coco_pretrain.imdb_files.train.anno_file=0001",
                             "dataset_config.coco_pretrain.imdb_files.train={mask_folder: null}"])
    assert cfg.dataset_config.coco_pretrain.imdb_files.train.anno_file == "0001"
    assert load_config(None, ["training.experiment_name=nULL"]).training.experiment_name == "nULL"  # not a YAML null


def test_a_shipped_config_is_the_same_config_in_another_install(tmp_path):
    """A checkpoint stores the config's path; the package moved (another clone, a new virtual environment):
    its shipped config is still the same experiment, a user's file of that name elsewhere is not."""
    from rmae.config import config_identity

    name = "RMAE/COCO/rmae_fh_4000eps.yaml"
    assert config_identity(CONFIG_ROOT / name) == name
    # recorded by an older checkpoint: the install may be gone or of another release
    assert config_identity(f"/old/venv/lib/python3.11/site-packages/rmae/configs/{name}", moved_install=True) == name
    assert config_identity(f"/home/u/clones/rmae/rmae/configs/{name}", moved_install=True) == name
    assert config_identity("/home/u/clones/rmae/rmae/configs/RMAE/mine.yaml", moved_install=True) \
        == "/home/u/clones/rmae/rmae/configs/RMAE/mine.yaml"
    assert config_identity(tmp_path / "configs" / name) == str((tmp_path / "configs" / name).resolve())
    clone = tmp_path / "clone" / "rmae" / "configs" / name  # another clone's copy: the same while unedited
    clone.parent.mkdir(parents=True)
    shutil.copyfile(CONFIG_ROOT / name, clone)
    assert config_identity(clone) == name
    clone.write_text(clone.read_text() + "\ntraining:\n  max_update: 10\n")
    assert config_identity(clone) == str(clone.resolve())
    assert config_identity(tmp_path / "gone" / "rmae" / "configs" / name) != name  # (only as a recorded path)
    assert config_identity(tmp_path / "rmae/configs/mine.yaml") == str((tmp_path / "rmae/configs/mine.yaml").resolve())


def test_a_schedule_apart_from_the_run_length_is_reported():
    from rmae.config import schedule_warnings

    (short,) = schedule_warnings(load_config(None, ["training.max_update=300", "scheduler.params.T_max=200"]))
    assert "T_max (200) < training.max_update (300): the last 100 updates run at the final lr" in short
    (long,) = schedule_warnings(load_config(None, ["training.max_update=300", "scheduler.params.T_max=400"]))
    assert "T_max (400) > training.max_update (300): the run ends before the cosine schedule does" in long
    assert schedule_warnings(load_config(None, ["training.max_update=300"])) == []


def test_a_number_for_a_name_in_a_file_says_to_quote_it(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("training:\n  experiment_name: 0001\n")
    with pytest.raises(ConfigError, match=r"experiment_name must be a string, got 1 \(int\) \(.*must be quoted"):
        load_config(f)
    f.write_text("training:\n  experiment_name: '0001'\n")
    assert load_config(f).training.experiment_name == "0001"
