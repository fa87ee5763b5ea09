"""Config system: shipped recipes parse and build, bad keys/values are rejected with close matches."""
import pytest
import torch

from rmae.config import ConfigError, find_config, load_config, model_section, shipped_configs
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
    ("training.max_updat=3", "training.max_update"),
    ("trainng.seed=1", "training.seed"),
    ("model_config.rmae.mae_vit.params.num_regions=3", "model_config.rmae.mae_vit.params.num_region"),
    ("optimizer.params.weight_decy=0.1", "optimizer.params.weight_decay"),
])
def test_unknown_keys_name_close_matches(override, expected):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(None, [override])
    assert expected in str(e.value)


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


def test_missing_config_suggests():
    with pytest.raises(ConfigError, match="rmae_fh_4000eps"):
        load_config("RMAE/COCO/rmae_fh_400eps.yaml")


def test_cli_reports_config_errors(capsys):
    assert main(["training.max_updat=3"]) == 2
    assert "training.max_update" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["--config", "MAE/COCO/mae_4000eps.yaml", "--print-config"]) == 0
    assert "max_update: 144000" in capsys.readouterr().out


def test_meta_build_of_huge():
    cfg = load_config("RMAE/COCO/rmae_fh_4000eps.yaml", ["model_config.rmae.mae_vit.arch=rmae_huge_patch14"])
    model = build_model_from_config(cfg, "meta")
    assert next(model.parameters()).device == torch.device("meta")
    assert model.patch_size == 14
