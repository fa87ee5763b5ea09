"""Training loop on CPU: short run, exact resume (also after a real SIGTERM), accumulation, FSDP2 over gloo,
resume on another rank count, non-finite steps skipped, one history per run folder, corrupt checkpoints, the
command line, schedule and parameter groups."""
import contextlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rmae import checkpoint as ckpt
from rmae.config import ConfigError, load_config
from rmae.distributed import apply_slurm_env, expand_nodelist, slurm_allocation_unused
from rmae.train import WarmupCosine, build_model_from_config, param_groups, rank_start, train

# A tiny, fast setting: 32 px (4 patches, 1 visible), batch 8, the bundled photos with in-memory FH.
BASE = [
    "model_config.rmae.mae_vit.arch=rmae_tiny_patch16", "model_config.rmae.mae_vit.params.img_size=32",
    "training.batch_size=8", "training.num_workers=0", "training.log_interval=1", "training.progress_bar=false",
    "training.checkpoint_interval=1000", "training.visualize_interval=0", "scheduler.params.warmup_iterations=2",
    "scheduler.params.T_max=40", "optimizer.params.lr=1e-3", "training.pin_memory=false",
    # conftest turns on the Triton CPU interpreter (for the kernel tests); the loop is tested on the PyTorch path
    "model_config.rmae.mae_vit.params.kernel_impl=reference",
]
THREADS = 2  # the same in every process: the thread count changes float summation order
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": str(THREADS),
       "PYTHONUNBUFFERED": "1"}


def cfg_for(run_dir, *extra):
    return load_config(None, BASE + [f"training.save_dir={run_dir}", *extra])


def log_records(run_dir, event=None):
    recs = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    if event is None:
        return [r for r in recs if "loss" in r and "event" not in r]
    return [r for r in recs if r.get("event") == event]


def losses(run_dir):
    out = {}
    for r in log_records(run_dir):
        out[r["step"]] = r["loss"]  # a resumed run re-logs nothing twice; keep the last value per step
    return [out[k] for k in sorted(out)]


def final_model(run_dir):
    return torch.load(ckpt.latest_checkpoint(run_dir), map_location="cpu", weights_only=False)["model"]


def assert_models_close(a, b, rtol=1e-4, atol=2e-5):
    # Adam normalises each gradient element: round-off on near-zero gradients moves a weight by up to ~lr·1e-2
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    """A COCO-shaped folder: 6 small images and their FH masks (the COCO recipe's 3 scales)."""
    from PIL import Image

    from rmae.data import COCO_FH
    from rmae.fh import felzenszwalb_multi
    from rmae.masks import mask_path, save_labels

    root = tmp_path_factory.mktemp("data")
    images, masks = root / "coco" / "image" / "train2017", root / "coco" / "image" / "fh_train2017"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(6):
        name = f"{n + 1:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / name)
        decoded = np.asarray(Image.open(images / name).convert("RGB"))
        labels = felzenszwalb_multi(decoded, COCO_FH.scales, COCO_FH.sigma, COCO_FH.min_sizes)
        save_labels(mask_path(masks, name), labels)
    return root


def coco_args(root, *extra):
    return ["--dataset", "coco", f"dataset_config.coco_pretrain.data_dir={root}", *extra]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
def test_short_run_loss_falls_and_files_written(tmp_path):
    run = tmp_path / "run"
    summary = train(cfg_for(run, "training.max_update=30", "scheduler.params.T_max=30",
                            "training.visualize_interval=15", "training.checkpoint_interval=10",
                            "training.num_checkpoint=2"))
    ls = summary["losses"]
    assert len(ls) == 30 and all(map(lambda v: v == v, ls))
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5
    assert (run / "config.yaml").is_file() and (run / "log.jsonl").is_file()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt_00000020.pt", "ckpt_00000030.pt"]
    assert (run / "vis" / "step_00000015.png").is_file() and (run / "vis" / "step_00000030.png").is_file()
    assert [(r["step"], Path(r["file"]).name) for r in log_records(run, "pictures")] == [
        (15, "step_00000015.png"), (30, "step_00000030.png")]  # each picture is announced
    rec = log_records(run)[-1]
    assert list(rec)[2:5] == ["loss", "mae_loss", "region_loss"]  # (after time and step) the loss terms together
    rec = log_records(run)[-1]
    for key in ("loss", "mae_loss", "region_loss", "lr", "grad_norm", "img_per_s", "step_time", "data_time",
                "compute_time", "peak_mem_mb", "skipped", "data_errors"):
        assert key in rec, key
    state = torch.load(ckpt.latest_checkpoint(run), map_location="cpu", weights_only=False)
    assert state["step"] == 30 and state["data_position"] == 30 * 8
    assert not any(k.startswith(("_orig_mod.", "module.")) or "._orig_mod." in k for k in state["model"])
    from safetensors.torch import load_file

    enc = load_file(str(run / "encoder.safetensors"))
    assert "blocks.0.attn.qkv.weight" in enc and "cls_token" in enc and "pos_embed" in enc
    assert not any(k.startswith("decoder") or k.startswith("region") for k in enc)
    torch.testing.assert_close(enc["blocks.0.attn.qkv.weight"], state["model"]["blocks.0.attn.qkv.weight"])


def test_resume_equals_uninterrupted(tmp_path):
    full = train(cfg_for(tmp_path / "a", "training.max_update=8"))["losses"]
    first = train(cfg_for(tmp_path / "b", "training.max_update=4"))["losses"]
    second = train(cfg_for(tmp_path / "b", "training.max_update=8"))  # finds ckpt_00000004.pt and continues
    assert log_records(tmp_path / "b", "resume")[0]["step"] == 4
    assert first + second["losses"] == full  # exactly, step for step
    assert_models_close(final_model(tmp_path / "a"), final_model(tmp_path / "b"), rtol=0, atol=0)


def test_sigterm_saves_and_resume_matches(tmp_path):
    run = tmp_path / "killed"
    # one loader worker, and the signal goes to the whole process group (as Slurm and a terminal send it)
    args = [sys.executable, "-m", "rmae.train", *BASE, f"training.save_dir={run}", "training.max_update=400",
            "training.num_workers=1"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "log.jsonl").is_file() and len(log_records(run)) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    (ev,) = log_records(run, "interrupted")
    stopped = ev["step"]
    assert 3 <= stopped < 400
    assert ckpt.latest_checkpoint(run).name == f"ckpt_{stopped:08d}.pt"
    n = stopped + 2
    resumed = train(cfg_for(run, f"training.max_update={n}"))
    reference = train(cfg_for(tmp_path / "ref", f"training.max_update={n}"))["losses"]
    assert losses(run) == reference
    assert resumed["step"] == n


def test_stray_distributed_variables_are_a_clear_error(tmp_path, monkeypatch, capsys):
    """WORLD_SIZE left in the environment (an earlier torchrun session) without RANK, or RANK and WORLD_SIZE without
    MASTER_ADDR: an error saying so, before anything is written (it was the process group's traceback)."""
    from rmae.train import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*BASE, f"training.save_dir={tmp_path / 'run'}", "training.max_update=1"]) == 2
    assert "WORLD_SIZE=2 is set but RANK is not" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert main([*BASE, f"training.save_dir={tmp_path / 'run'}", "training.max_update=1"]) == 2
    assert "RANK and WORLD_SIZE=2 are set but MASTER_ADDR is not" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_second_ctrl_c_during_a_checkpoint_write_stops_after_it():
    """torch's archive writer turns a KeyboardInterrupt inside it into a RuntimeError (a traceback, exit 1): a second
    Ctrl-C while a checkpoint is written stops right after the write instead; outside one it stops at once."""
    from rmae.train import StopFlag

    stop = StopFlag(announce=False)
    stop._handle(signal.SIGINT, None)  # the first: stop after this update
    written = []
    with pytest.raises(KeyboardInterrupt):
        with stop.holding():
            stop._handle(signal.SIGINT, None)  # the second, mid-write: held
            written.append("checkpoint")
    assert written == ["checkpoint"]
    with stop.holding():
        pass  # (nothing held: no interrupt)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_img_per_s_leaves_out_checkpoint_writes(tmp_path, monkeypatch):
    """A log window's img/s is its updates' rate: a checkpoint written between two log lines (here made to take
    1.5 s) does not count into the next window (it read 10-20x too low there)."""
    save = ckpt.save_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(1.5)
        return save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=4", "training.checkpoint_interval=2"))
    rec = {r["step"]: r for r in log_records(run)}[3]  # the window right after the checkpoint of step 2
    assert rec["img_per_s"] * rec["step_time"] > 0.5 * 8, rec  # img/s ≈ batch / step time (without: 8 / 1.6 s)


def test_first_log_line_times_the_updates_after_the_start_up(tmp_path, monkeypatch):
    """The run's first update carries the start-up (workers, compilation: minutes on a GPU): the first line's img/s
    and times are those of the updates after it (here the first batch is made to take 1.5 s), its losses all."""
    import rmae.train as train_module

    calls = []
    next_batch = train_module.next_batch

    def slow_first(it):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)
        return next_batch(it)

    monkeypatch.setattr(train_module, "next_batch", slow_first)
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=4", "training.log_interval=4"))
    (rec,) = log_records(run)
    assert rec["step"] == 4 and rec["data_time"] < 0.3, rec  # (with the first update: 1.5 s / 4 and more)
    assert rec["img_per_s"] * rec["step_time"] > 0.5 * 8, rec
    monkeypatch.setattr(train_module, "next_batch", next_batch)
    train(cfg_for(tmp_path / "each", "training.max_update=4", "training.log_interval=1"))
    assert rec["loss"] == pytest.approx(sum(r["loss"] for r in log_records(tmp_path / "each")) / 4, rel=1e-5)


def test_records_of_steps_after_the_last_checkpoint_are_set_aside_on_resume(tmp_path, monkeypatch, capsys):
    """A run killed (-9, a node failure) after its last checkpoint logged steps it has to redo: the resumed run
    moves those records (and a line cut short) out of log.jsonl, so every step is logged once, and TensorBoard
    is told to purge them (purge_step)."""
    import types as _types

    written, tags = [], set()
    stub = _types.ModuleType("torch.utils.tensorboard")

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            written.append(purge_step)

        def add_scalar(self, tag, value, step):
            tags.add(tag)

        def close(self):
            pass

    stub.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", stub)
    run = tmp_path / "crashed"
    train(cfg_for(run, "training.max_update=4", "training.checkpoint_interval=2", "training.tensorboard=true"))
    # died after logging step 4, before its checkpoint (and so before its pictures, encoder and done record) ...
    (run / "checkpoints" / "ckpt_00000004.pt").unlink()
    shutil.rmtree(run / "vis")
    (run / "encoder.safetensors").unlink()
    records = (run / "log.jsonl").read_text().splitlines(keepends=True)
    (run / "log.jsonl").write_text("".join(line for line in records if '"event": "done"' not in line
                                           and not ('"event": "checkpoint"' in line and '"step": 4' in line)))
    with open(run / "log.jsonl", "a") as f:
        f.write('{"time": 1, "step": 5, "lo')  # ... while writing a record
    train(cfg_for(run, "training.max_update=5", "training.checkpoint_interval=2", "training.tensorboard=true"))
    assert written == [None, 3]
    # the metric records' numbers only (no event's: resume's world_size, a skipped try's loss ...)
    assert {"train/loss", "train/lr", "train/img_per_s", "train/region_loss"} <= tags
    assert not tags & {"train/world_size", "train/from_world_size", "train/signal", "train/skipped_tries"}, tags
    assert [r["step"] for r in log_records(run)] == [1, 2, 3, 4, 5]
    (tail,) = (run / "previous").glob("*/log.after_step_2.jsonl")
    lines = tail.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines[:-1] if "loss" in line] == [3, 4]
    assert lines[-1].endswith('"lo')
    assert f"the log's records after it (a run that stopped without a checkpoint of its last steps) were moved to " \
           f"{tail}" in capsys.readouterr().err


def test_a_ctrl_c_while_the_run_starts_is_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C after 'start' but before the first update (the loader's workers starting): the run stops after its
    first update with a checkpoint (the signal was ignored there, and the run went on to the end)."""
    import rmae.train as rt

    real = rt.picture_batch

    def interrupted_while_starting(dataset, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(dataset, *args, **kwargs)

    monkeypatch.setattr(rt, "picture_batch", interrupted_while_starting)
    run = tmp_path / "run"
    summary = train(cfg_for(run, "training.max_update=5", "training.num_workers=1"))
    assert summary["step"] == 1 and summary["interrupted"]
    assert ckpt.latest_checkpoint(run).name == "ckpt_00000001.pt"
    assert "stopping after this update (a checkpoint is saved)" in capsys.readouterr().err


def test_a_second_ctrl_c_stops_at_once_and_is_logged_as_an_interruption(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt out of the loop (the second Ctrl-C) exits 130 with a message, the log's last record is
    an 'interrupted' event (it was an 'error' with an empty message); one while the settings are checked, before
    the run has a folder, exits 130 without a traceback; --resume with training.resume=false is refused."""
    import rmae.train as rt

    real, calls = rt.next_batch, []

    def second_ctrl_c(it):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(it)

    monkeypatch.setattr(rt, "next_batch", second_ctrl_c)
    run = tmp_path / "run"
    assert rt.main([*BASE, f"training.save_dir={run}", "training.max_update=5"]) == 130
    assert "interrupted without a checkpoint of the current update" in capsys.readouterr().err
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "interrupted" and last["step"] == 2 and "without a checkpoint" in last["message"]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rt, "load_config", ctrl_c)
    assert rt.main([*BASE, f"training.save_dir={tmp_path / 'other'}"]) == 130
    err = capsys.readouterr().err
    assert "interrupted before training started" in err and "Traceback" not in err
    monkeypatch.undo()
    assert rt.main([*BASE, f"training.save_dir={run}", "--resume", "training.resume=false"]) == 2
    assert "--resume (continue from the newest checkpoint) contradicts training.resume=false" in capsys.readouterr().err


def test_a_missing_tensorboard_is_recorded_in_the_log(tmp_path, monkeypatch):
    """training.tensorboard=true (the recipes' setting) without the package: the run goes on, and log.jsonl says so
    like the other setting warnings (it was on the console only)."""
    from rmae.logging_utils import RunLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # (import fails)
    log = RunLogger(tmp_path, True, tensorboard=True)
    log.log({"step": 1, "loss": 1.0}, console=False)
    (warning,) = log_records(tmp_path, "config_warning")
    assert warning["message"].startswith("tensorboard requested but unavailable") and log.tb is None
    assert [r["step"] for r in log_records(tmp_path)] == [1]


def test_rerunning_a_finished_run_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=2"))
    capsys.readouterr()
    assert train(cfg_for(run, "training.max_update=2"))["step"] == 2
    assert "the run is already at step 2 of training.max_update=2: nothing to train" in capsys.readouterr().err
    assert [r["step"] for r in log_records(run)] == [1, 2]
    # asked for fewer updates than it has: config.yaml still describes the run beside it (trained to 2)
    train(cfg_for(run, "training.max_update=1"))
    assert "max_update: 2\n" in (run / "config.yaml").read_text()


def test_sigusr1_checkpoints_and_exits_cleanly(tmp_path):
    """Slurm's preemption signal (sbatch --signal=USR1@...) in the same process: the update in flight
    finishes, a checkpoint is written, train() returns, and the previous handler is back."""
    import threading

    run = tmp_path / "preempted"
    before = signal.getsignal(signal.SIGUSR1)

    def send_when_running():
        deadline = time.time() + 60
        while time.time() < deadline:
            if (run / "log.jsonl").is_file() and len(log_records(run)) >= 2:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    sender = threading.Thread(target=send_when_running, daemon=True)
    sender.start()
    summary = train(cfg_for(run, "training.max_update=400"))
    sender.join(timeout=5)
    (ev,) = log_records(run, "interrupted")
    assert 2 <= ev["step"] < 400 and summary["step"] == ev["step"]
    assert ckpt.latest_checkpoint(run).name == f"ckpt_{ev['step']:08d}.pt"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_kernel_index_checks_run_on_the_first_update_only(tmp_path, monkeypatch):
    """Each index check is a host sync on a GPU: the loop validates its first update, then skips them,
    and leaves the process as it found it."""
    from rmae.kernels import _dispatch

    monkeypatch.delenv("RMAE_KERNELS_CHECK_INDICES", raising=False)
    seen = []
    real = _dispatch.check_indices_enabled
    monkeypatch.setattr(_dispatch, "check_indices_enabled", lambda: seen.append(real()) or seen[-1])
    train(cfg_for(tmp_path / "run", "training.max_update=3"))
    assert seen and seen[0] is True and seen[-1] is False  # checked in update 1, skipped in 2 and 3
    assert seen.index(False) > 0 and all(not v for v in seen[seen.index(False):])
    assert real() is True  # back to the environment's default after the run


def test_accumulation_equals_big_batch(tmp_path):
    train(cfg_for(tmp_path / "big", "training.max_update=2"))
    train(cfg_for(tmp_path / "acc", "training.max_update=2", "training.iter_per_update=2"))
    torch.testing.assert_close(losses(tmp_path / "big"), losses(tmp_path / "acc"), rtol=1e-5, atol=1e-6)
    assert_models_close(final_model(tmp_path / "big"), final_model(tmp_path / "acc"))


def test_a_random_seed_is_drawn_once_recorded_and_kept_on_resume(tmp_path):
    """training.seed=-1 (or null), the original's "random seed": a seed is drawn, logged and recorded in config.yaml;
    a resume with -1 keeps the seed the run drew (no settings-changed warning), and giving that seed repeats the
    run."""
    from omegaconf import OmegaConf

    run = tmp_path / "random"
    train(cfg_for(run, "training.max_update=2", "training.seed=-1"))
    seed = OmegaConf.load(run / "config.yaml").training.seed
    assert isinstance(seed, int) and 0 <= seed < 2**32
    train(cfg_for(run, "training.max_update=3", "training.seed=null"))
    assert OmegaConf.load(run / "config.yaml").training.seed == seed
    (changed,) = log_records(run, "run_settings_changed")
    assert changed["changed"] == ["training.max_update: 2 in the checkpoint, 3 now"]  # (not the seed)
    train(cfg_for(tmp_path / "given", "training.max_update=3", f"training.seed={seed}"))
    assert losses(run) == losses(tmp_path / "given")


def test_rank_start_never_repeats_a_drawn_sample():
    """Rank r draws r, r + W, ... from its start s on (global draws s*W + r): after a position no multiple of W
    (another batch size and rank count before), every draw from there on is new and fewer than W are skipped."""
    for position in range(40):
        for world in (1, 2, 3, 4, 8):
            first = rank_start(position, world) * world  # the first global draw of the resumed run
            assert position <= first < position + world
    assert rank_start(6, 4) == 2 and rank_start(8, 4) == 2 and rank_start(6, 1) == 6


def test_torchrun_fsdp2_matches_single_process_and_resumes_on_one_rank(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    dist_run = tmp_path / "dist"
    cmd = [str(torchrun), "--nproc_per_node=2", "--standalone", "-m", "rmae.train",
           *BASE, f"training.save_dir={dist_run}", "training.max_update=2"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert log_records(dist_run, "start")[0]["world_size"] == 2
    train(cfg_for(tmp_path / "single", "training.max_update=2"))
    torch.testing.assert_close(losses(dist_run), losses(tmp_path / "single"), rtol=1e-5, atol=1e-6)
    assert_models_close(final_model(dist_run), final_model(tmp_path / "single"))
    # the 2-rank checkpoint continues on 1 rank like the single-process run ...
    train(cfg_for(dist_run, "training.max_update=3"))
    train(cfg_for(tmp_path / "single", "training.max_update=3"))
    assert_models_close(final_model(dist_run), final_model(tmp_path / "single"))
    # ... and that 1-rank checkpoint continues on 2 ranks
    r = subprocess.run(cmd[:-1] + ["training.max_update=4"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert log_records(dist_run, "resume")[-1]["from_world_size"] == 1
    train(cfg_for(tmp_path / "single", "training.max_update=4"))
    torch.testing.assert_close(losses(dist_run), losses(tmp_path / "single"), rtol=1e-5, atol=1e-6)
    assert_models_close(final_model(dist_run), final_model(tmp_path / "single"))


def test_plain_launch_spawns_one_process_per_device(tmp_path, monkeypatch):
    """``python -m rmae.train`` on a node with several devices spawns one rank each: the GPU rule
    (all visible GPUs) is checked on the launcher's decision, and the spawn itself runs on CPU
    (gloo, distributed.world_size=2) and matches one process."""
    from rmae import distributed as rdist

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rdist.resolve_launch({"world_size": None, "no_spawn": False}, None) == 4
    assert rdist.resolve_launch({"world_size": None, "no_spawn": True}, None) == 0
    assert rdist.resolve_launch({"world_size": None, "no_spawn": False}, "cpu") == 0
    monkeypatch.undo()

    spawned = tmp_path / "spawned"
    cmd = [sys.executable, "-m", "rmae.train", *BASE, f"training.save_dir={spawned}", "training.max_update=2",
           "training.device=cpu", "distributed.world_size=2"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert log_records(spawned, "start")[0]["world_size"] == 2
    assert log_records(spawned, "start")[0]["threads"] == THREADS  # OMP_NUM_THREADS given: kept
    train(cfg_for(tmp_path / "single", "training.max_update=2"))
    torch.testing.assert_close(losses(spawned), losses(tmp_path / "single"), rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _spawned_run(run: Path, **popen_options):
    """A run of 2 spawned CPU ranks and 400 updates, in a process group of its own, given once it has logged a step;
    killed if the test leaves it running."""
    cmd = [sys.executable, "-m", "rmae.train", *BASE, f"training.save_dir={run}", "training.max_update=400",
           "training.device=cpu", "distributed.world_size=2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_options)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((run / "log.jsonl").is_file() and log_records(run)):
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _stopped_with_a_checkpoint(run: Path, proc: subprocess.Popen, err: str) -> dict:
    """The run's 'interrupted' event, after checking that it exited 0 with a checkpoint of that step."""
    assert proc.returncode == 0, err[-3000:]
    (event,) = log_records(run, "interrupted")
    assert ckpt.latest_checkpoint(run).name == f"ckpt_{event['step']:08d}.pt" and event["step"] < 400
    return event


def test_a_ctrl_c_reaches_the_spawned_ranks_not_the_launcher(tmp_path):
    """A terminal's Ctrl-C goes to the whole process group: the ranks checkpoint and exit 0, and the launcher
    waits for them (it raised KeyboardInterrupt and exited 130 with a message saying nothing was written)."""
    run = tmp_path / "run"
    with _spawned_run(run, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as proc:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    _stopped_with_a_checkpoint(run, proc, err)
    assert err.count("stopping after this update") == 1 and "before training started" not in err, err[-3000:]


def test_sigterm_to_the_launcher_alone_reaches_the_ranks_and_a_second_run_is_refused(tmp_path, capsys):
    """kill, timeout or a container's stop signal the launcher only: it passes SIGTERM on to the ranks, which
    checkpoint and exit 0, and waits for them (it exited at once with 143, the ranks were left to finish on their
    own, and killed with it in a container). While the run lasts, a second run into its folder (a requeued job, a
    retry) is refused naming the process that holds it (it set aside and deleted the first one's files)."""
    from rmae.train import main

    run = tmp_path / "run"
    with _spawned_run(run) as proc:
        assert main([*BASE, f"training.save_dir={run}", "training.max_update=3"]) == 2
        err = capsys.readouterr().err
        assert re.search(rf"error: another run is writing into \S*run \(pid {proc.pid} on \S+\); wait for it to "
                         r"end, or give another training.save_dir", err), err
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    event = _stopped_with_a_checkpoint(run, proc, err)
    assert train(cfg_for(run, f"training.max_update={event['step'] + 1}"))["step"] == event["step"] + 1


def test_ranks_whose_launcher_is_killed_write_nothing_more(tmp_path):
    """The launcher holds the run folder's lock; when it is killed (SIGKILL, an OOM kill) its spawned ranks get
    PyTorch's parent-death SIGINT, once per thread the launcher had. They stop at once without a checkpoint or a log
    record (the second SIGINT read as a second Ctrl-C wrote 'stopped at once' into the log; with one SIGINT they
    checkpointed: both into a folder no longer locked, where a restarted run may already be at work) and say why."""
    run = tmp_path / "run"
    with _spawned_run(run) as proc:
        before = sorted(p.name for p in ckpt.checkpoint_dir(run).glob("*")) if ckpt.checkpoint_dir(run).is_dir() else []
        records = len(log_records(run))
        proc.kill()
        _, err = proc.communicate(timeout=240)  # (the ranks hold the pipes until they exit)
    after = sorted(p.name for p in ckpt.checkpoint_dir(run).glob("*")) if ckpt.checkpoint_dir(run).is_dir() else []
    assert after == before
    assert not log_records(run, "interrupted") and not log_records(run, "error") and len(log_records(run)) <= records + 1
    assert "the launcher of the spawned ranks died, and with it the run folder's lock" in err, err[-3000:]


def test_spawned_ranks_log_each_ranks_shard_cache_and_the_data_errors_of_all(tmp_path, coco_tree):
    """sampler=shard on 2 ranks: a shard_cache record per rank (rank 1's was lost), and data_errors counts the
    unreadable samples of every rank (it was rank 0's count): the bad image is in rank 1's shard."""
    root = tmp_path / "data"
    shutil.copytree(coco_tree, root)
    (root / "coco" / "image" / "train2017" / "000000000002.jpg").write_bytes(b"garbage")  # image 1: rank 1's
    run = tmp_path / "spawned"
    cmd = [sys.executable, "-m", "rmae.train", *BASE, f"training.save_dir={run}", "training.max_update=2",
           "training.device=cpu", "distributed.world_size=2",
           *coco_args(root, "dataset_config.coco_pretrain.sampler=shard")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    caches = log_records(run, "shard_cache")
    assert [c["rank"] for c in caches] == [0, 1] and [c["items"] for c in caches] == [3, 3]
    # rank 1 draws 4 samples a step from its 3 images: the bad one at least twice in 2 steps
    assert log_records(run)[-1]["data_errors"] >= 2


def test_spawned_ranks_report_user_errors_like_one_process(tmp_path):
    """A self-spawned multi-process run that cannot start (here: --resume with no checkpoint) prints
    ``error:`` and exits 2, as one process does, instead of a traceback per rank."""
    cmd = [sys.executable, "-m", "rmae.train", "--resume", *BASE, f"training.save_dir={tmp_path / 'empty'}",
           "training.max_update=2", "training.device=cpu", "distributed.world_size=2"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error" in r.stderr and "checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_mae_model_trains_and_exports(tmp_path):
    """--model mae: pixels only (no region branch, no region loss), checkpoints and encoder written."""
    from rmae.train import main

    run = tmp_path / "mae"
    tiny = [a.replace("model_config.rmae.", "model_config.mae.") for a in BASE]
    assert main(["--model", "mae", *tiny, "training.max_update=2", f"training.save_dir={run}"]) == 0
    start = log_records(run, "start")[0]
    assert start["num_region"] == 0 and start["arch"] == "rmae_tiny_patch16"
    records = log_records(run)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert all("region_loss" not in r or r["region_loss"] in (None, 0.0) for r in records)
    assert (run / "encoder.safetensors").is_file() and ckpt.latest_checkpoint(run) is not None
    done = log_records(run, "done")[0]
    assert done["encoder"] == str(run / "encoder.safetensors")
    assert done["load_with"] == 'timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)'
    # our training checkpoint loads into a model with the library's safe default (weights_only=True)
    from rmae.models import load_checkpoint

    model = build_model_from_config(load_config(None, tiny, model="mae"), "cpu")
    assert not load_checkpoint(model, ckpt.latest_checkpoint(run)).missing_keys


def _poison_second_forward(monkeypatch, value, onwards=False, then=None):
    """The loss of the second update (forward call 2; ``onwards``: and every later one) becomes ``value`` times
    itself; ``then()`` runs after each poisoned call."""
    import rmae.train as rt

    real = rt.build_model_from_config

    def poisoned(cfg, device=None):
        model = real(cfg, device)
        forward, calls = model.forward, {"n": 0}

        def fwd(*a, **k):
            out = forward(*a, **k)
            calls["n"] += 1
            if calls["n"] == 2 or (onwards and calls["n"] > 2):
                out.loss = out.loss * value
                if then is not None:
                    then()
            return out

        model.forward = fwd
        return model

    monkeypatch.setattr(rt, "build_model_from_config", poisoned)


def test_nonfinite_step_is_skipped(tmp_path, monkeypatch):
    _poison_second_forward(monkeypatch, float("nan"))
    run = tmp_path / "nan"
    summary = train(cfg_for(run, "training.max_update=3"))
    # the skip carries the number of its update, as the update's metric record does
    assert summary["skipped"] == 1 and log_records(run, "skip")[0]["step"] == 2
    assert [(r["step"], r["skipped"]) for r in log_records(run)] == [(1, 0), (2, 1), (3, 1)]
    assert all(torch.isfinite(v).all() for v in final_model(run).values() if v.is_floating_point())


def test_updates_that_stay_nonfinite_end_the_run_as_diverged(tmp_path, monkeypatch, capsys):
    """The original stops after 100 skipped iterations in a row; so does training.max_skips_in_a_row: an error
    (exit status 2, event=error), not a 'done' run whose checkpoint and encoder are the diverged model's."""
    from rmae.train import main

    _poison_second_forward(monkeypatch, float("nan"), onwards=True)
    run = tmp_path / "diverged"
    assert main([*BASE, f"training.save_dir={run}", "training.max_update=10", "training.max_skips_in_a_row=3"]) == 2
    err = capsys.readouterr().err
    assert ("error: 3 tries in a row of update 2, each on a new batch, had a non-finite loss or gradient, so the "
            "weights have not changed since step 1") in err, err
    assert [r["step"] for r in log_records(run, "skip")] == [2, 2, 2]
    (error,) = log_records(run, "error")
    assert error["type"] == "TrainingDiverged" and error["step"] == 1
    assert not log_records(run, "done") and not (run / "encoder.safetensors").exists()


def test_a_skipped_try_is_not_an_update(tmp_path, monkeypatch):
    """As the original: a non-finite try is done again on the next batch and counts neither towards max_update nor
    in the lr schedule; the updates and their log records are those of a run that never met the bad batch, and a
    run stopped and resumed around the skip trains the same."""
    _poison_second_forward(monkeypatch, float("nan"))
    skipping = train(cfg_for(tmp_path / "skipping", "training.max_update=3"))
    records = log_records(skipping["run_dir"])
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    monkeypatch.undo()
    assert [r["lr"] for r in records] == [r["lr"] for r in log_records(
        train(cfg_for(tmp_path / "clean", "training.max_update=3"))["run_dir"])]  # the schedule does not move
    assert len(skipping["losses"]) == 3 and ckpt.latest_checkpoint(tmp_path / "skipping").name == "ckpt_00000003.pt"
    # the window of all three updates: their means, no nan
    _poison_second_forward(monkeypatch, float("nan"))
    (window,) = log_records(train(cfg_for(tmp_path / "win", "training.max_update=3",
                                          "training.log_interval=3"))["run_dir"])
    for key in ("loss", "mae_loss", "region_loss", "grad_norm"):
        assert window[key] == pytest.approx(sum(r[key] for r in records) / 3, rel=1e-6), key
    # stopped (SIGUSR1) during the skipped try: the checkpoint of step 1 is written again with the data position
    # after the bad batch, so the resumed run does not meet it a second time
    monkeypatch.undo()
    _poison_second_forward(monkeypatch, float("nan"), then=lambda: os.kill(os.getpid(), signal.SIGUSR1))
    stopped = train(cfg_for(tmp_path / "stopped", "training.max_update=3"))
    assert stopped["step"] == 1 and stopped["skipped"] == 1
    monkeypatch.undo()
    resumed = train(cfg_for(tmp_path / "stopped", "training.max_update=3"))
    assert resumed["skipped"] == 1 and losses(tmp_path / "stopped") == [r["loss"] for r in records]
    # the skip before the stop is part of the checkpoint's history: not set aside as records after it
    assert not (tmp_path / "stopped" / "previous").exists() and len(log_records(tmp_path / "stopped", "skip")) == 1


def test_pictures_show_the_same_samples_after_a_resume(tmp_path, monkeypatch):
    """vis/ pictures of one run are comparable: the same images and crops at every step, whatever the
    start, the resume or the batch size (they were the first micro-batch after each start)."""
    import rmae.train as rt

    shown = []
    real = rt.visualize_now

    def record(model, raw, cfg, vis_batch, *a):
        shown.append(vis_batch)
        return real(model, raw, cfg, vis_batch, *a)

    monkeypatch.setattr(rt, "visualize_now", record)
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=2", "training.visualize_interval=1"))
    train(cfg_for(run, "training.max_update=3", "training.visualize_interval=1", "training.iter_per_update=2"))
    assert len(shown) == 3 and shown[0][0].shape[0] == 4
    for images, regions in shown[1:]:
        torch.testing.assert_close(images, shown[0][0], rtol=0, atol=0)
        assert regions.keys() == shown[0][1].keys() and all(torch.equal(regions[k], shown[0][1][k]) for k in regions)
    assert sorted(p.name for p in (run / "vis").iterdir()) == [f"step_{s:08d}.png" for s in (1, 2, 3)]


def test_fresh_start_moves_the_earlier_run_aside(tmp_path):
    """training.resume=false in a folder with checkpoints: the earlier run goes to previous/<time>/ whole, so
    pruning cannot favour its later steps and a plain rerun continues the new run."""
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=4", "training.checkpoint_interval=2"))  # ckpt 2, 4
    train(cfg_for(run, "training.max_update=3", "training.checkpoint_interval=1", "training.resume=false"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    (old,) = (run / "previous").iterdir()
    assert [p.name for p in ckpt.list_checkpoints(old)] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    assert [r["step"] for r in log_records(old)] == [1, 2, 3, 4]
    assert log_records(run, "moved_earlier_run")[0]["to"] == str(old)
    train(cfg_for(run, "training.max_update=4"))
    assert log_records(run, "resume")[0]["file"].endswith("ckpt_00000003.pt")
    assert [r["step"] for r in log_records(run)] == [1, 2, 3, 4] and len(log_records(run, "start")) == 1


def test_resume_file_moves_later_checkpoints_aside(tmp_path):
    """Continuing from an earlier checkpoint of the folder: the checkpoints after it (another history) and the
    log's records after it go to previous/<time>/; the ones up to it stay. Pruning never deletes a later
    checkpoint."""
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=4", "training.checkpoint_interval=2"))  # ckpt 2, 4
    two = ckpt.checkpoint_dir(run) / "ckpt_00000002.pt"
    train(cfg_for(run, "training.max_update=3", f"training.resume_file={two}"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    (old,) = (run / "previous").iterdir()
    assert [p.name for p in ckpt.list_checkpoints(old)] == ["ckpt_00000004.pt"]
    later = [json.loads(line) for line in (old / "log.after_step_2.jsonl").read_text().splitlines()]
    assert [r["step"] for r in later if "loss" in r and "event" not in r] == [3, 4]
    assert log_records(run, "resume")[0]["step"] == 2 and [r["step"] for r in log_records(run)] == [1, 2, 3]


def test_pruning_never_deletes_a_later_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.checkpoint_dir(tmp_path).mkdir()
    (ckpt.checkpoint_dir(tmp_path) / "ckpt_00000009.pt").write_bytes(b"later")
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=step, extra={}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000003.pt", "ckpt_00000009.pt"]


def test_pruning_ignores_a_folder_with_a_checkpoint_name(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    (ckpt.checkpoint_dir(tmp_path) / "ckpt_00000000.pt").mkdir(parents=True)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=step, extra={}, keep=1)
    names = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    assert names == ["ckpt_00000000.pt", "ckpt_00000003.pt"] and (ckpt.checkpoint_dir(tmp_path) / names[0]).is_dir()


def test_a_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A full disk during the write: the error goes up, no temporary file stays (nor counts), and the
    temporary files a killed write left are removed before the next write needs the space (also in a run folder
    whose name holds glob characters)."""
    tmp_path = tmp_path / "exp[1]*?"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=1, extra={})
    killed = ckpt.checkpoint_dir(tmp_path) / ".ckpt_00000002.pt.tmp.99999"
    killed.write_bytes(b"partial")
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=2, extra={})
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == ["ckpt_00000001.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=2, extra={})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000001.pt", "ckpt_00000002.pt"]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    from rmae.train import main

    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=4", "training.checkpoint_interval=2"))  # ckpt 2, 4
    four = ckpt.checkpoint_dir(run) / "ckpt_00000004.pt"
    four.write_bytes(four.read_bytes()[:1000])  # truncated, as by a crash or a full disk
    summary = train(cfg_for(run, "training.max_update=5"))
    (ev,) = log_records(run, "resume")
    assert ev["step"] == 2 and ev["unreadable"] == [str(four)] and summary["step"] == 5
    (old,) = (run / "previous").iterdir()  # renamed, kept to look at (not retried), with the history after 2
    assert (ckpt.checkpoint_dir(old) / "ckpt_00000004.pt.corrupt").is_file()
    # none readable: a clear error naming every file, nothing renamed
    for p in ckpt.list_checkpoints(run):
        p.write_bytes(b"garbage")
    assert main([*BASE, f"training.save_dir={run}", "training.max_update=6"]) == 2
    err = capsys.readouterr().err
    assert "ckpt_00000002.pt" in err and "ckpt_00000005.pt" in err and "Traceback" not in err
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt_00000002.pt", "ckpt_00000005.pt"]
    # an explicit resume_file that cannot be read: an error naming it, no fallback
    two = ckpt.checkpoint_dir(run) / "ckpt_00000002.pt"
    with pytest.raises(ckpt.CheckpointError, match="ckpt_00000002.pt cannot be read"):
        train(cfg_for(run, "training.max_update=6", f"training.resume_file={two}"))


def test_a_read_error_is_not_taken_for_a_damaged_checkpoint(tmp_path, monkeypatch):
    """An I/O error while reading the newest checkpoint (EIO, a stale NFS handle, no memory) says nothing about the
    file: resuming stops with an error naming it, renames nothing and does not fall back to an older checkpoint
    (which would silently lose the updates in between). An empty file is named as such and is set aside."""
    import errno

    run = tmp_path / "run"
    folder = ckpt.checkpoint_dir(run)
    folder.mkdir(parents=True)
    for step in (2, 4):
        torch.save({"model": {}, "step": step, "version": ckpt.FORMAT_VERSION}, folder / f"ckpt_{step:08d}.pt")
    real_load = torch.load

    def failing_load(path, *args, **kwargs):
        if str(path).endswith("ckpt_00000004.pt"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_00000004\.pt could not be read \(OSError: .*Input/output "
                                                   r"error.*not taken as damage") as raised:
        ckpt.read_latest(run)
    assert not isinstance(raised.value, ckpt.CorruptCheckpoint)
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    for error in (MemoryError(), OSError(errno.ESTALE, "Stale file handle")):
        monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(error))
        with pytest.raises(ckpt.CheckpointError, match="not taken as damage"):
            ckpt.read_checkpoint(folder / "ckpt_00000004.pt")
    monkeypatch.setattr(torch, "load", real_load)
    (folder / "ckpt_00000004.pt").write_bytes(b"")
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"ckpt_00000004\.pt is empty \(0 bytes"):
        ckpt.read_checkpoint(folder / "ckpt_00000004.pt")
    path, payload, unreadable = ckpt.read_latest(run)
    assert path.name == "ckpt_00000002.pt" and payload["step"] == 2 and unreadable == [str(folder / "ckpt_00000004.pt")]
    assert (folder / "ckpt_00000004.pt.corrupt").is_file()


def test_a_checkpoint_holding_other_objects_is_refused_not_unpickled(tmp_path):
    """Checkpoints are read with weights_only: a file that pickles another object (code that would run on
    loading) is an error naming it, neither loaded nor renamed as corrupt, and no older checkpoint is taken. The
    numpy RNG array of earlier versions' checkpoints still loads, and damaged bytes inside an intact archive
    are a corrupt checkpoint (the next older one is used)."""
    import argparse
    import zipfile

    import numpy as np

    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=2", "training.checkpoint_interval=1"))
    one, two = (ckpt.checkpoint_dir(run) / f"ckpt_0000000{s}.pt" for s in (1, 2))
    payload = torch.load(two, weights_only=True)
    torch.save({**payload, "extra": argparse.Namespace(lr=1)}, two)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_00000002.pt holds objects other than tensors.*Namespace"):
        train(cfg_for(run, "training.max_update=3"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    # an earlier version's checkpoint: numpy's RNG key array as an array
    older = {**payload, "rng": [{**r, "numpy": (r["numpy"][0], np.asarray(r["numpy"][1], dtype=np.uint32),
                                                *r["numpy"][2:])} for r in payload["rng"]]}
    torch.save(older, two)
    assert isinstance(ckpt.read_checkpoint(two)["step"], int)
    # damaged bytes in the pickle of the newest: reported, renamed .corrupt, the run continues from step 1
    with zipfile.ZipFile(two) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    pickled = next(name for name in entries if name.endswith("data.pkl"))
    entries[pickled] = entries[pickled][:5] + bytes(50) + entries[pickled][55:]
    with zipfile.ZipFile(two, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    train(cfg_for(run, "training.max_update=3"))
    assert log_records(run, "resume")[-1]["step"] == 1


def test_damaged_weights_in_an_intact_archive_are_found_by_their_checksums(tmp_path, capsys):
    """Bytes damaged in place inside a tensor's data (size and zip directory intact, so the memory-mapped load reads
    them as weights): the archive's CRC-32s tell, so resuming takes the next older checkpoint and the export
    refuses the file, instead of training on (or exporting) 3e38s. A file that is no torch file, or an empty one,
    is named as such."""
    from rmae.export import main as export_main

    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=2", "training.checkpoint_interval=1"))
    two = ckpt.checkpoint_dir(run) / "ckpt_00000002.pt"
    with open(two, "r+b") as f:
        f.seek(two.stat().st_size // 2)
        f.write(b"\x7f" * 64)
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"ckpt_00000002\.pt is damaged: its part \S+ does not match its "
                                                     r"checksum"):
        ckpt.read_checkpoint(two)
    capsys.readouterr()
    assert export_main([str(two), str(tmp_path / "encoder.safetensors")]) == 2
    assert "ckpt_00000002.pt is damaged" in capsys.readouterr().err and not (tmp_path / "encoder.safetensors").exists()
    train(cfg_for(run, "training.max_update=3"))
    (resumed,) = log_records(run, "resume")
    assert resumed["step"] == 1 and resumed["unreadable"] == [str(two)]
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("notes.pt", "empty.pt"):
        assert export_main([str(tmp_path / name), str(tmp_path / "encoder.safetensors")]) == 2
        assert f"{name} is not a torch checkpoint (neither a zip archive nor a pickle" in capsys.readouterr().err


def test_an_unfinished_later_history_leaves_the_encoder(tmp_path):
    """A finished run (encoder of step 4) extended and killed after a later checkpoint (no finish: no new encoder):
    continuing from step 4 moves the later checkpoint, records and pictures, keeps the encoder (the kept
    history's) and copies config.yaml with the later history."""
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=4", "training.checkpoint_interval=2", "training.num_checkpoint=5"))
    encoder = (run / "encoder.safetensors").read_bytes()
    train(cfg_for(run, "training.max_update=6", "training.checkpoint_interval=2", "training.num_checkpoint=5"))
    (run / "encoder.safetensors").write_bytes(encoder)  # ... as if killed after checkpoint 6, before finishing
    records = (run / "log.jsonl").read_text().splitlines(keepends=True)
    (run / "log.jsonl").write_text("".join(r for r in records if not ('"event": "done"' in r and '"step": 6' in r)))
    four = ckpt.checkpoint_dir(run) / "ckpt_00000004.pt"
    train(cfg_for(run, "training.max_update=5", f"training.resume_file={four}"))
    (old,) = (run / "previous").iterdir()
    assert sorted(os.listdir(old)) == ["checkpoints", "config.yaml", "log.after_step_4.jsonl", "vis"]
    assert (run / "encoder.safetensors").is_file()


def test_fallback_resume_sets_the_later_history_aside(tmp_path, capsys):
    """Falling back from a corrupt newest checkpoint (6) to step 4 sets the later history aside (the .corrupt
    file, the log's records after step 4, the encoder, the pictures of steps 5 and 6) as a resume_file at step 4
    does; the run folder keeps steps 1-4 of its log, its config and its earlier pictures."""
    moved = {}
    for how in ("fallback", "resume_file"):
        run = tmp_path / how
        train(cfg_for(run, "training.max_update=6", "training.checkpoint_interval=2"))  # ckpt 4, 6; vis 6
        six, four = ckpt.checkpoint_dir(run) / "ckpt_00000006.pt", ckpt.checkpoint_dir(run) / "ckpt_00000004.pt"
        if how == "fallback":
            six.write_bytes(six.read_bytes()[:1000])
            train(cfg_for(run, "training.max_update=5"))
        else:
            train(cfg_for(run, "training.max_update=5", f"training.resume_file={four}"))
        (old,) = (run / "previous").iterdir()
        moved[how] = sorted(os.listdir(old))
        assert [p.name for p in ckpt.checkpoint_dir(old).iterdir()] == [six.name + ".corrupt" * (how == "fallback")]
        later = [json.loads(line) for line in (old / "log.after_step_4.jsonl").read_text().splitlines()]
        assert [r["step"] for r in later if "loss" in r and "event" not in r] == [5, 6]
        assert [r["step"] for r in later if r.get("event") == "done"] == [6]
        assert (old / "vis" / "step_00000006.png").is_file() and not (run / "vis" / "step_00000006.png").exists()
        assert (run / "config.yaml").is_file() and (run / "encoder.safetensors").is_file()  # (the new run's)
        assert [r["step"] for r in log_records(run)] == [1, 2, 3, 4, 5]
        assert [r["step"] for r in log_records(run, "done")] == [5]
        assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt_00000004.pt", "ckpt_00000005.pt"]
        assert f"held after step 4 (checkpoints, encoder.safetensors, log.after_step_4.jsonl, vis) was moved to {old}" \
            in capsys.readouterr().err
    assert moved["fallback"] == moved["resume_file"] == ["checkpoints", "config.yaml", "encoder.safetensors",
                                                         "log.after_step_4.jsonl", "vis"]


def test_a_failed_start_is_not_set_aside(tmp_path):
    """A start that failed before its first update (here: no dataset) leaves no history: a retry does not move
    its config and start record to previous/. A log with steps but no checkpoint is still set aside."""
    from rmae.train import main

    run = tmp_path / "run"
    missing = [*BASE, f"training.save_dir={run}", "training.max_update=2",
               *coco_args(tmp_path / "no_data")]
    assert main(missing) == 2 and (run / "log.jsonl").is_file()
    assert main(missing) == 2
    train(cfg_for(run, "training.max_update=2"))
    assert not (run / "previous").exists()
    assert [r["step"] for r in log_records(run)] == [1, 2] and len(log_records(run, "start")) == 3
    shutil.rmtree(ckpt.checkpoint_dir(run))  # as a crash before the first checkpoint
    train(cfg_for(run, "training.max_update=1"))
    (old,) = (run / "previous").iterdir()
    assert [r["step"] for r in log_records(old)] == [1, 2] and [r["step"] for r in log_records(run)] == [1]


@pytest.mark.parametrize("model", ["rmae", "rae"])
def test_mae_recipe_runs_with_a_region_model(tmp_path, coco_tree, model):
    """official_models.yaml: every recipe runs with any --model. An MAE recipe (region_source: none) with a
    model that has regions reads the FH masks, as the R-MAE recipes do, and says so."""
    from rmae.train import main

    run = tmp_path / model
    tiny = [f"model_config.{model}.mae_vit.arch=rmae_tiny_patch16", f"model_config.{model}.mae_vit.params.img_size=32",
            f"model_config.{model}.mae_vit.params.kernel_impl=reference", "training.use_fp16=none",
            "training.tensorboard=false"]
    assert main(["--config", "MAE/COCO/mae_4000eps.yaml", "--model", model, *BASE, *tiny, "training.max_update=1",
                 f"training.save_dir={run}", *coco_args(coco_tree)]) == 0
    (ev,) = log_records(run, "region_source")
    assert ev["source"] == "offline"
    assert "set dataset_config.coco_pretrain.region_source to offline, online or online_crop" in ev["message"]
    assert math.isfinite(log_records(run)[-1]["region_loss"])


def test_shard_cache_size_is_reported(tmp_path, coco_tree):
    run = tmp_path / "shard"
    train(load_config(None, BASE + [f"training.save_dir={run}", "training.max_update=1",
                                    f"dataset_config.coco_pretrain.data_dir={coco_tree}",
                                    "dataset_config.coco_pretrain.sampler=shard"], dataset="coco"))
    (ev,) = log_records(run, "shard_cache")
    assert ev["rank"] == 0 and ev["items"] == ev["of"] == 6 and 0 < ev["mib"] < ev["limit_mib"] == 8192


def test_a_mask_folder_of_other_fh_parameters_is_a_recorded_warning(tmp_path, coco_tree):
    """Masks made on purpose with other FH scales (the same count): the run trains on them and says so once,
    on the console and as event=data_warning."""
    root = tmp_path / "data"
    shutil.copytree(coco_tree, root)
    (root / "coco" / "image" / "fh_train2017" / "fh_params.json").write_text(
        json.dumps({"scales": [400, 1000, 1500], "min_sizes": [500, 1000, 1500], "sigma": 0.8}))
    run = tmp_path / "run"
    train(load_config(None, BASE + [f"training.save_dir={run}", "training.max_update=1",
                                    f"dataset_config.coco_pretrain.data_dir={root}"], dataset="coco"))
    (ev,) = log_records(run, "data_warning")
    assert "records the FH recipe scales 400,1000,1500, min sizes 500,1000,1500" in ev["message"], ev
    assert math.isfinite(log_records(run)[-1]["region_loss"])


def test_data_errors_count_the_training_samples_across_a_resume(tmp_path, coco_tree):
    """data_errors: the unreadable images skipped for the samples trained on, carried across a resume (it restarted
    at 0), not counting the pictures' samples (read once per start: each start added its own) nor the batches a
    loader worker has read ahead (a resume counted those twice)."""
    from rmae.data import DataConfig, InfiniteSampler, build_dataset

    root = tmp_path / "data"
    shutil.copytree(coco_tree, root)
    (root / "coco" / "image" / "train2017" / "000000000001.jpg").write_bytes(b"garbage")  # image 0, in the pictures
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = lambda run, n: load_config(None, BASE + [f"training.save_dir={run}", f"training.max_update={n}",  # noqa
                                                   "training.num_workers=1",
                                                   f"dataset_config.coco_pretrain.data_dir={root}"], dataset="coco")
    train(cfg(straight, 4))
    train(cfg(resumed, 2))
    train(cfg(resumed, 4))
    dataset = build_dataset(DataConfig(dataset="coco", split="train2017", root=str(root), img_size=32), seed=0)
    draws, expected = iter(InfiniteSampler(len(dataset), seed=0)), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            for _ in range(8):
                dataset[next(draws)]
            expected.append(dataset.error_count)
    assert expected[-1] >= 5  # the bad image once in every 6 draws, or more (as a replacement)
    assert [r["data_errors"] for r in log_records(straight)] == expected
    assert [r["data_errors"] for r in log_records(resumed)] == expected


def test_skip_warnings_read_as_log_lines(tmp_path, coco_tree):
    """An unreadable image's warning, from the main process and from a loader worker, reads as the console log's
    lines (it read 'rmae.data:0: RuntimeWarning: ...')."""
    root = tmp_path / "data"
    shutil.copytree(coco_tree, root)
    (root / "coco" / "image" / "train2017" / "000000000001.jpg").write_bytes(b"garbage")
    (root / "coco" / "image" / "train2017" / "000000000006.jpg").write_bytes(b"garbage too")  # not in the pictures
    args = [sys.executable, "-m", "rmae.train", *BASE, f"training.save_dir={tmp_path / 'run'}", "training.max_update=2",
            "training.num_workers=1", *coco_args(root)]
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("000000000001.jpg", "000000000006.jpg"):  # main process (pictures), worker
        assert re.search(rf"^\d\d:\d\d:\d\d WARNING skipping sample: cannot decode image \S*{name}", proc.stderr,
                         re.M), proc.stderr
    assert "rmae.data:0" not in proc.stderr


def test_log_lines_are_not_glued_to_the_progress_bar(tmp_path, coco_tree):
    """On a terminal (a pseudo-terminal here, 120 columns), console lines go through tqdm.write: each starts a line
    of its own above the bar."""
    import fcntl
    import pty
    import struct
    import termios

    run = tmp_path / "bar"
    args = [sys.executable, "-m", "rmae.train", *BASE, f"training.save_dir={run}", "training.max_update=2",
            "training.checkpoint_interval=1", "training.progress_bar=true",
            *coco_args(coco_tree, "dataset_config.coco_pretrain.sampler=shard")]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other side closed (EIO)
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    err = b"".join(chunks).decode(errors="replace")
    assert "\r" in err and ("step/s" in err or "s/step" in err), err  # the bar was drawn
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines() if " INFO " in line]  # (after the bar's clearing)
    assert any("event=checkpoint step=1" in line for line in lines), err
    assert any("event=shard_cache" in line for line in lines), err  # the cache size reaches the console
    # the metric lines (lr, grad norm, memory: not in the bar's postfix) print above the bar too
    assert any(re.search(r"step=2 .*lr=.*grad_norm=.*peak_mem_mb=", line) for line in lines), err
    assert all(re.match(r"\d\d:\d\d:\d\d INFO ", line) for line in lines), lines


def test_progress_in_a_log_file_is_whole_lines(capsys, monkeypatch):
    """Where stderr is no terminal (CI, a slurm .out file): whole lines with rate and ETA, at most one per
    interval and one at the end, no carriage-return frames; a terminal that reports no width gets a bar of a
    fixed width (tqdm drew none)."""
    from rmae import logging_utils

    progress = logging_utils.progress_bar(10, 2, True, desc="FH masks", unit="img", every=0.0)
    for _ in range(8):
        progress.update(1)
        progress.set_postfix({"loss": "1.5"})
    progress.close()
    progress.close()  # (once)
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) == 9, err
    assert re.match(r"FH masks: 3/10 imgs \(30%\), [\d.e+]+ img/s, elapsed 0:00:00, ETA \d+:\d\d:\d\d$",
                    err.splitlines()[0]), err
    assert err.splitlines()[-1].startswith("FH masks: 10/10 imgs (100%)") and "ETA" not in err.splitlines()[-1]
    assert err.splitlines()[-1].endswith("loss=1.5")
    quiet = logging_utils.progress_bar(10, 0, True, every=60.0)
    quiet.update(3)
    assert capsys.readouterr().err == ""  # within the interval: nothing yet
    quiet.close()
    assert capsys.readouterr().err.startswith("3/10 steps (30%)")
    monkeypatch.setattr(logging_utils, "_is_terminal", lambda stream: True)
    monkeypatch.setattr(logging_utils.shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((0, 0)))
    bar = logging_utils.progress_bar(10, 0, True)
    assert bar.ncols == 100 and not bar.dynamic_ncols
    bar.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_mask_of_another_size_is_skipped_and_a_folder_of_them_is_a_clean_error(tmp_path, coco_tree, capsys, workers):
    """One mask made from another image: the run goes on and counts it in data_errors (its warning, naming both
    files, is tested with the dataset; it stopped the run before, and every resume again at the same draw). All masks so: a data error (exit 2) at
    the first batch naming the fault, without a traceback."""
    from rmae.masks import save_labels
    from rmae.train import main

    root = tmp_path / "data"
    shutil.copytree(coco_tree, root)
    masks = root / "coco" / "image" / "fh_train2017"
    save_labels(masks / "000000000001.npy.zst", np.zeros((3, 10, 10), np.uint16))
    args = [*BASE, "training.max_update=1", f"training.num_workers={workers}", *coco_args(root)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, f"training.save_dir={tmp_path / 'run'}"]) == 0  # the first update draws all 6 images
    assert log_records(tmp_path / "run")[-1]["data_errors"] == 1
    for mask in masks.glob("*.npy.zst"):
        save_labels(mask, np.zeros((3, 10, 10), np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, f"training.save_dir={tmp_path / 'run2'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: 10 consecutive unreadable samples in coco/train2017, the last: mask \S*fh_train2017/"
                     r"\d+\.npy\.zst is 10x10 \(WxH\) but image", err), err
    assert "Traceback" not in err, err


def test_a_missing_dataset_is_explained_in_config_keys(tmp_path, coco_tree, capsys):
    """The data library says root= and regions='offline'; the training command's error names the config keys
    (data_dir, region_source), and the run's log ends with the error, not with a 'start' that seems to hang."""
    from rmae.train import main

    run = tmp_path / "run"
    assert main([*BASE, f"training.save_dir={run}", *coco_args(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "set $E2E_DATASETS or dataset_config.coco_pretrain.data_dir to change it" in err, err
    assert "dataset_config.coco_pretrain.region_source=offline" in err and "regions=" not in err and "root=" not in err
    events = [json.loads(line).get("event") for line in (run / "log.jsonl").read_text().splitlines()]
    assert events[-1] == "error" and "start" in events
    (error,) = log_records(run, "error")
    assert error["type"] == "DatasetNotFoundError" and "Expected under" in error["message"]
    assert main([*BASE, f"training.save_dir={run}", *coco_args(tmp_path / "nothing")]) == 2  # the retry
    assert not (run / "previous").exists()  # a failed start is no history to set aside
    capsys.readouterr()
    root = tmp_path / "data"  # images, but no mask folder
    shutil.copytree(coco_tree, root)
    shutil.rmtree(root / "coco" / "image" / "fh_train2017")
    assert main([*BASE, f"training.save_dir={tmp_path / 'run2'}", *coco_args(root)]) == 2
    err = capsys.readouterr().err
    assert "mask folder" in err and "dataset_config.coco_pretrain.region_source=online" in err, err
    shutil.copytree(coco_tree / "coco" / "image" / "fh_train2017", root / "coco" / "image" / "fh_train2017")
    (root / "coco" / "image" / "fh_train2017" / "000000000002.npy.zst").unlink()  # found when the loader starts
    assert main([*BASE, f"training.save_dir={tmp_path / 'run3'}", *coco_args(root)]) == 2
    err = capsys.readouterr().err
    assert "000000000002.npy.zst" in err and "dataset_config.coco_pretrain.region_source=online" in err, err
    assert "regions=" not in err and "'online_crop'" not in err
    (error,) = log_records(tmp_path / "run3", "error")
    assert "dataset_config.coco_pretrain.region_source=online" in error["message"]
    # a folder of one's own with the split's annotation file, then without a mask folder: both named as keys
    key = "dataset_config.coco_pretrain.imdb_files.train"
    shutil.copytree(root / "coco" / "image" / "train2017", tmp_path / "photos")
    own = [f"{key}.image_folder=[{tmp_path / 'photos'}]", f"{key}.mask_folder=[{tmp_path / 'm'}]"]
    assert main([*BASE, f"training.save_dir={tmp_path / 'run4'}", *coco_args(root), "dataset_config.coco_pretrain."
                 "imdb_files.train.anno_file=[annotations/instances_train2017.json]", *own]) == 2
    err = capsys.readouterr().err
    assert f"({key}.anno_file: a COCO-style json" in err and f"; {key}.anno_file=null lists the folder" in err, err
    assert main([*BASE, f"training.save_dir={tmp_path / 'run5'}", *coco_args(root), f"{key}.anno_file=null", *own]) == 2
    err = capsys.readouterr().err
    assert f"({key}.mask_folder names another folder; null: {tmp_path / 'fh_photos'})" in err, err
    assert f"--images {tmp_path / 'photos'} --out {tmp_path / 'm'}" in err and "Expected" not in err


def test_a_failure_before_the_first_update_restores_the_signal_handlers(tmp_path, monkeypatch):
    """The pictures' batch is read after the stop handlers are installed: its data error must not leave them
    installed (a later Ctrl-C in the same process would be swallowed) nor skip the log's error record."""
    import signal

    import rmae.train as rt

    def unusable(dataset):
        raise rt.DataError("mask x.npy.zst is 10x10 but image x.jpg is 64x48")

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    monkeypatch.setattr(rt, "picture_batch", unusable)
    run = tmp_path / "run"
    with pytest.raises(rt.DataError, match="10x10"):
        train(cfg_for(run, "training.max_update=2"))
    assert {s: signal.getsignal(s) for s in before} == before
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "error" and last["type"] == "DataError" and "step" not in last


def test_demo_variants_have_their_own_run_folders():
    from rmae.train import run_dir_of

    assert [run_dir_of(load_config(None, [], model=m)) for m in ("rmae", "mae", "rae")] == [
        Path("runs/demo_rmae"), Path("runs/demo_mae"), Path("runs/demo_rae")]


def test_resuming_another_model_is_a_clear_error(tmp_path):
    from rmae.config import _arch_values

    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=1"))
    mae = cfg_for(run, "model=mae", "model_config.mae.mae_vit.arch=rmae_tiny_patch16",
                  "model_config.mae.mae_vit.params.img_size=32")
    with pytest.raises(ConfigError, match=r"(?s)ckpt_00000001.pt is of another model:\n  model: 'rmae' in the "
                                          r"checkpoint, 'mae' now.*training.resume=false"):
        train(mae)
    with pytest.raises(ConfigError, match=r"model_config.rmae.mask_ratio: 0.75 in the checkpoint, 0.5 now"):
        train(cfg_for(run, "model_config.rmae.mask_ratio=0.5"))
    # the same network spelled otherwise continues: a parameter set to the architecture's value it was left at
    # (null), the original's MAE name of the architecture
    tiny_regions = _arch_values("rmae_tiny_patch16", "rmae")["num_region"]
    assert train(cfg_for(run, "training.max_update=2", f"model_config.rmae.mae_vit.params.num_region={tiny_regions}",
                         "model_config.rmae.mae_vit.arch=mae_tiny_patch16"))["step"] == 2
    with pytest.raises(ConfigError, match=rf"num_region: {tiny_regions} in the checkpoint, 2 now"):
        train(cfg_for(run, "training.max_update=3", "model_config.rmae.mae_vit.params.num_region=2"))


def test_default_run_folder_of_another_config_file_is_not_continued(tmp_path, monkeypatch):
    """runs/<model>_<dataset>_<stem> is shared by a/exp.yaml and b/exp.yaml: b's run refuses a's checkpoint
    (it continued it, warning only about the lr) unless the folder is named explicitly."""
    monkeypatch.chdir(tmp_path)
    for name, lr in (("a", "1e-3"), ("b", "5e-4")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "exp.yaml").write_text(f"includes: [default.yaml]\noptimizer:\n  params:\n    lr: {lr}\n")
    tiny = [a for a in BASE if not a.startswith("optimizer.params.lr")] + ["training.experiment_name=null"]
    train(load_config("a/exp.yaml", tiny + ["training.max_update=2"]))
    run = Path("runs/rmae_sample_exp")
    assert ckpt.latest_checkpoint(run) is not None
    with pytest.raises(ConfigError, match=r"another config file: .*a/exp\.yaml.*b/exp\.yaml"):
        train(load_config("b/exp.yaml", tiny + ["training.max_update=3"]))
    train(load_config("a/exp.yaml", tiny + ["training.max_update=3"]))  # the same file continues
    meta = torch.load(ckpt.latest_checkpoint(run), weights_only=True)
    assert meta["config_identity"] == str((tmp_path / "a" / "exp.yaml").resolve())  # recorded at save time
    assert train(load_config("b/exp.yaml", tiny + ["training.max_update=4", f"training.save_dir={run}"]))["step"] == 4


def test_default_run_folder_of_other_data_is_not_continued(tmp_path, monkeypatch, coco_tree):
    """runs/<model>_<dataset>_<stem> does not name the image folders: a run of the same config on another folder
    refuses the checkpoint there (it continued it silently) unless the folder is named explicitly."""
    monkeypatch.chdir(tmp_path)
    tiny = BASE + ["training.experiment_name=null", *coco_args(coco_tree)[2:]]
    train(load_config(None, tiny + ["training.max_update=2"], dataset="coco"))
    other = tiny + ["dataset_config.coco_pretrain.imdb_files.train.anno_file=null"]
    with pytest.raises(ConfigError, match=r"run on other data.*\n.*anno_file: \['annotations/instances_train2017"
                                          r"\.json'\] in the checkpoint, None now"):
        train(load_config(None, other + ["training.max_update=3"], dataset="coco"))
    assert train(load_config(None, tiny + ["training.max_update=3"], dataset="coco"))["step"] == 3  # same data
    assert train(load_config(None, other + ["training.max_update=4", "training.experiment_name=other"],
                             dataset="coco"))["step"] == 4


def test_the_datasets_root_is_compared_as_resolved(tmp_path, monkeypatch, coco_tree):
    """$E2E_DATASETS chooses the data when data_dir is null: another root through it is other data (it continued
    silently), and data_dir naming the same folder as the variable is the same data (it was refused)."""
    monkeypatch.chdir(tmp_path)
    other_root = tmp_path / "other"
    shutil.copytree(coco_tree, other_root)
    tiny = BASE + ["training.experiment_name=null"]
    monkeypatch.setenv("E2E_DATASETS", str(coco_tree))
    train(load_config(None, tiny + ["training.max_update=2"], dataset="coco"))
    monkeypatch.setenv("E2E_DATASETS", str(other_root))
    with pytest.raises(ConfigError, match=rf"run on other data.*\n.*datasets root \(data_dir, else \$E2E_DATASETS\): "
                                          rf"'{coco_tree.resolve()}' in the checkpoint, '{other_root.resolve()}' now"):
        train(load_config(None, tiny + ["training.max_update=3"], dataset="coco"))
    same = tiny + [f"dataset_config.coco_pretrain.data_dir={coco_tree}"]
    assert train(load_config(None, same + ["training.max_update=3"], dataset="coco"))["step"] == 3
    # every folder absolute: the root chooses nothing, another one is the same data
    key = "dataset_config.coco_pretrain.imdb_files.train"
    absolute = tiny + [f"{key}.image_folder=[{coco_tree / 'coco' / 'image' / 'train2017'}]", f"{key}.anno_file=null",
                       f"{key}.mask_folder=[{coco_tree / 'coco' / 'image' / 'fh_train2017'}]",
                       "training.experiment_name=absolute"]
    train(load_config(None, absolute + ["training.max_update=2"], dataset="coco"))
    monkeypatch.setenv("E2E_DATASETS", str(tmp_path / "elsewhere"))
    assert train(load_config(None, absolute + ["training.max_update=3"], dataset="coco"))["step"] == 3
    (changed,) = log_records(tmp_path / "runs" / "absolute", "run_settings_changed")
    assert changed["changed"] == ["training.max_update: 2 in the checkpoint, 3 now"]  # not the root


def test_resume_file_that_is_a_folder_is_named_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        train(cfg_for(tmp_path / "run", f"training.resume_file={tmp_path}"))


def test_skipped_count_survives_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poison_second_forward(monkeypatch, float("nan"))
    assert train(cfg_for(run, "training.max_update=2"))["skipped"] == 1
    monkeypatch.undo()
    assert train(cfg_for(run, "training.max_update=3"))["skipped"] == 1
    assert log_records(run)[-1]["skipped"] == 1 and log_records(run, "done")[-1]["skipped"] == 1


def test_resume_trains_with_the_configured_optimizer_settings(tmp_path):
    """The checkpoint's optimizer state carries the hyperparameters it was saved with; a resumed run with other
    settings trains with the configured ones (those config.yaml records) and says which differed."""
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=2", "optimizer.params.weight_decay=0.05"))
    new = ["optimizer.params.weight_decay=0.2", "optimizer.params.wd_norm=0.01", "optimizer.params.betas=[0.8,0.9]",
           "optimizer.params.eps=1e-6"]
    train(cfg_for(run, "training.max_update=3", *new))
    groups = {g["name"]: g for g in torch.load(ckpt.latest_checkpoint(run), map_location="cpu",
                                               weights_only=False)["optimizer"]["param_groups"]}
    # wd_norm is a switch, as in the original: not 0, so norm weights decay at weight_decay (norm biases stay
    # exempt, wd_bias being 0)
    assert {name: g["weight_decay"] for name, g in groups.items()} == \
        {"decay": 0.2, "norm": 0.2, "bias": 0.0, "norm_bias": 0.0}
    assert all(tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-6 for g in groups.values())
    changed = log_records(run, "optimizer_settings_changed")[-1]["changed"]
    assert sorted(changed) == ["optimizer.params.betas: (0.9, 0.95) -> (0.8, 0.9)",
                               "optimizer.params.eps: 1e-08 -> 1e-06",
                               "weight decay of the decay group (weight_decay): 0.05 -> 0.2",
                               "weight decay of the norm group (wd_norm): 0.0 -> 0.2"]
    train(cfg_for(run, "training.max_update=4", *new))  # the same settings again: nothing to report
    assert len(log_records(run, "optimizer_settings_changed")) == 1


def test_fp16_skip_backs_off_like_grad_scaler(tmp_path, monkeypatch, capsys):
    """An overflow step halves the scale and restarts the growth count, as GradScaler.update() does."""
    run = tmp_path / "run"
    _poison_second_forward(monkeypatch, float("inf"))
    assert train(cfg_for(run, "training.max_update=4", "training.use_fp16=float16"))["skipped"] == 1
    assert "training.use_fp16=float16 on the CPU" in capsys.readouterr().err  # a 10x slower choice there
    assert any("use_fp16=float16 on the CPU" in r["message"] for r in log_records(run, "config_warning"))
    state = torch.load(ckpt.latest_checkpoint(run), map_location="cpu", weights_only=False)["scaler"]
    scaler = torch.amp.GradScaler("cpu")
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.1)
    for factor in (1.0, float("inf"), 1.0, 1.0, 1.0):  # good, overflow (tried again), good, good, good
        scaler.scale((p * factor).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert state == scaler.state_dict() and state["_growth_tracker"] == 3


def test_warmup_longer_than_the_schedule_is_reported(tmp_path):
    """A recipe shortened with training.max_update alone keeps its 12000 warm-up updates: the lr never decays.
    The run goes on (a smoke test may want exactly that) but says so, on the console and in the log."""
    from rmae.config import schedule_warnings

    coco = load_config("RMAE/COCO/rmae_fh_4000eps.yaml", ["training.max_update=5000"])
    (message,) = schedule_warnings(coco)
    assert "warmup_iterations (12000) >= scheduler.params.T_max (5000" in message
    assert schedule_warnings(load_config("RMAE/COCO/rmae_fh_4000eps.yaml")) == []
    assert "ends before the lr reaches" in schedule_warnings(
        load_config(None, ["training.max_update=20", "scheduler.params.T_max=100",
                           "scheduler.params.warmup_iterations=30"]))[0]
    assert schedule_warnings(load_config(None, ["training.max_update=20", "scheduler.params.use_warmup=false",
                                                "scheduler.params.warmup_iterations=30"])) == []
    run = tmp_path / "run"
    import logging

    from rmae.logging_utils import logger

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    recorder = Recorder()
    logger.addHandler(recorder)
    try:
        train(cfg_for(run, "training.max_update=2", "scheduler.params.T_max=2",
                      "scheduler.params.warmup_iterations=5"))
    finally:
        logger.removeHandler(recorder)
    assert any("warmup_iterations (5) >= scheduler.params.T_max (2" in line for line in recorder.lines)
    assert "never decays" in log_records(run, "config_warning")[0]["message"]


def test_cli_overrides_around_options(capsys):
    from rmae.train import main, parse_args

    args = parse_args(["training.save_dir=x", "--resume", "training.max_update=5", "--model", "mae",
                       "training.seed=3", "--config", "default.yaml", "--task", "pretrain", "--dataset", "sample"])
    assert args.overrides == ["training.save_dir=x", "training.max_update=5", "training.seed=3"]
    assert (args.resume, args.model, args.config, args.task, args.dataset) == (True, "mae", "default.yaml",
                                                                                "pretrain", "sample")
    assert main(["training.max_update=5", "--print-config", "training.seed=3", "--model", "mae"]) == 0
    out = capsys.readouterr().out
    assert "max_update: 5" in out and "seed: 3" in out and "model: mae" in out
    assert parse_args(["--dataset", "imagenet"]).dataset == "imnet"  # the data API's other name


# ---------------------------------------------------------------------------------------------------------------
def test_schedule_warmup_then_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = WarmupCosine(opt, T_max=110, eta_min=0.1, warmup_factor=0.0, warmup_iterations=10)
    lrs = []
    for t in range(111):
        s.set(t)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_resume_from_a_checkpoint_of_three_weight_decay_groups(tmp_path):
    """Checkpoints written before the norm biases had a group of their own hold three groups (decay, norm, bias:
    the norm biases in the last); they resume, and each of today's four groups gets its own decay and name."""
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=2"))
    path = ckpt.latest_checkpoint(run)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    groups = payload["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["decay", "norm", "bias", "norm_bias"]
    groups[2]["params"] += groups.pop()["params"]  # the old layout
    torch.save(payload, path)
    train(cfg_for(run, "training.max_update=3"))
    saved = torch.load(ckpt.latest_checkpoint(run), map_location="cpu", weights_only=False)["optimizer"]
    assert [(g["name"], g["weight_decay"], g["lr"] > 0) for g in saved["param_groups"]] == \
        [("decay", 0.05, True), ("norm", 0.0, True), ("bias", 0.0, True), ("norm_bias", 0.0, True)]
    assert all(int(state["step"]) == 3 for state in saved["state"].values())  # the moments carried on
    # the group the file lacked gets the configured settings without a report of changed ones
    assert not log_records(run, "optimizer_settings_changed")


@pytest.mark.parametrize("wd_norm, wd_bias", [(0.0, 0.0), (0.01, 0.0), (0.0, 0.01), (0.01, 0.01)])
def test_weight_decay_groups_follow_the_original(wd_norm, wd_bias):
    """The original's rule (get_mae_parameters): no decay for a norm layer's parameters when wd_norm is 0 and for
    a bias when wd_bias is 0; every other parameter, whatever the switches' values, at weight_decay."""
    cfg = load_config(None, BASE)
    model = build_model_from_config(cfg, "cpu")
    groups = param_groups(model, 0.05, wd_norm, wd_bias)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    expected = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = (id(p) in norm_params and wd_norm == 0) or (name.endswith("bias") and wd_bias == 0)
            expected[id(p)] = 0.0 if exempt else 0.05
    assert decay_of == expected  # every trainable parameter once
    assert any(n.startswith("region_proj.0") for n, p in model.named_parameters() if id(p) in norm_params)
    assert [g["name"] for g in groups] == ["decay", "norm", "bias", "norm_bias"]  # whatever the switches


def test_slurm_environment():
    assert expand_nodelist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123",
            "SLURM_JOB_NODELIST": "node[4-5]", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16"}
    env = dict(srun)
    assert apply_slurm_env(env) and slurm_allocation_unused(env) is None
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "16", "1", "node4")
    # srun -n 4 inside an allocation of 16 tasks: the step's 4
    env = {**srun, "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}
    assert apply_slurm_env(env) and env["WORLD_SIZE"] == "4"
    # srun -w node5 -n 4 (or --relative): the step runs on node5, not on the allocation's first node, and two
    # steps of the job rendezvous on different ports
    step1 = {**srun, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "node5",
             "SLURM_STEP_ID": "1"}
    assert apply_slurm_env(step1) and step1["MASTER_ADDR"] == "node5"
    ports = {apply_slurm_env(e := {**srun, "SLURM_STEP_ID": str(i)}) and e["MASTER_PORT"] for i in range(4)}
    assert len(ports) == 4 and all(20000 <= int(p) < 40000 for p in ports)
    assert not apply_slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert not apply_slurm_env({**srun, "RANK": "0"})  # torchrun inside srun: torchrun's ranks
    # the batch script of 'sbatch --ntasks=16' (no srun): one process, not rank 0 of 16 waiting for the others
    batch = {k: v for k, v in srun.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"}
    assert not apply_slurm_env(batch) and "RANK" not in batch
    assert "not started by srun" in slurm_allocation_unused(batch)


def test_plain_launch_in_an_sbatch_script_trains_alone(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node1")
    from rmae.train import main

    with pytest.warns(UserWarning, match="allocation of 8 tasks but not started by srun"):
        assert main(BASE + [f"training.save_dir={tmp_path / 'run'}", "training.max_update=1",
                            "training.device=cpu"]) == 0
    assert "RANK" not in os.environ and final_model(tmp_path / "run")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_runs(tmp_path, monkeypatch, dtype):
    """The forward runs under autocast in the chosen dtype (the pixel decoder's prediction comes out in it), with
    float32 master weights and, for float16, a checkpointed GradScaler."""
    from rmae.models.rmae import RMAE

    seen, forward_loss = [], RMAE.forward_loss

    def spy(self, imgs, pred, mask):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), pred.dtype))
        return forward_loss(self, imgs, pred, mask)

    monkeypatch.setattr(RMAE, "forward_loss", spy)
    summary = train(cfg_for(tmp_path / dtype, "training.max_update=3", f"training.use_fp16={dtype}"))
    amp = getattr(torch, dtype)
    assert len(seen) >= 3 and all(s == (True, amp, amp) for s in seen), seen
    assert summary["step"] == 3 and all(v == v for v in summary["losses"])
    state = torch.load(ckpt.latest_checkpoint(tmp_path / dtype), map_location="cpu", weights_only=False)
    assert state["model"]["blocks.0.attn.qkv.weight"].dtype == torch.float32  # fp32 master weights
    if dtype == "float16":
        assert state["scaler"]["scale"] > 0  # GradScaler state is checkpointed


def test_compiled_matches_eager(tmp_path, capsys):  # about 1 min of cold inductor compile on 2 cores
    from torch._dynamo.utils import counters

    eager = train(cfg_for(tmp_path / "eager", "training.max_update=3"))["losses"]
    capsys.readouterr()
    counters.clear()
    compiled = train(cfg_for(tmp_path / "compiled", "training.max_update=3", "training.use_compile=true"))["losses"]
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile frames of the model
    assert "torch.compile: the first update compiles the model" in capsys.readouterr().err  # (no silent minute)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    state = torch.load(ckpt.latest_checkpoint(tmp_path / "compiled"), map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in k for k in state["model"])


def test_cli_demo_config_runs(tmp_path):
    """``python -m rmae.train`` without a config = the demo; here shortened to 2 updates."""
    from rmae.train import main

    run = tmp_path / "demo"
    assert main(["training.max_update=2", f"training.save_dir={run}", "training.num_workers=0",
                 "training.progress_bar=false", "model_config.rmae.mae_vit.params.kernel_impl=reference"]) == 0
    start = log_records(run, "start")[0]
    assert (start["arch"], start["img_size"], start["num_region"], start["batch_size"]) == ("rmae_tiny_patch16", 112, 8, 32)
    assert (run / "encoder.safetensors").is_file() and list((run / "vis").glob("*.png"))
    assert main(["--resume", f"training.save_dir={tmp_path / 'empty'}"]) == 2  # nothing to resume: a clear error
    assert not (tmp_path / "empty").exists()  # and no folder left behind (it held only the run lock)
    (tmp_path / "kept").mkdir()
    assert main(["--resume", f"training.save_dir={tmp_path / 'kept'}"]) == 2
    assert (tmp_path / "kept").is_dir()  # a folder that was there stays


def test_random_fg_takes_masks_from_the_loader(tmp_path, monkeypatch):
    """region_sample_type=random_fg (the original's option): the loader draws each sample's masking
    permutation with its regions, and the model must be run with exactly that noise."""
    from rmae import train as train_module
    from rmae.models import RMAE

    seen = []
    original_forward = RMAE.forward

    def spy(self, images, regions=None, noise=None, mask_ratio=0.75):
        seen.append(noise.detach().cpu().clone())
        return original_forward(self, images, regions, noise=noise, mask_ratio=mask_ratio)

    monkeypatch.setattr(RMAE, "forward", spy)
    loader_noise = []
    original_to_device = train_module.to_device

    def record(batch, device, num_region):
        if "noise" in batch:  # training batches of 8, the pictures' batch of 4
            loader_noise.append(batch["noise"].clone())
        return original_to_device(batch, device, num_region)

    monkeypatch.setattr(train_module, "to_device", record)
    run = tmp_path / "fg"
    assert train_module.main(["training.max_update=2", f"training.save_dir={run}", "training.num_workers=0",
                              "training.batch_size=8", "training.progress_bar=false",
                              "model_config.rmae.mae_vit.params.kernel_impl=reference",
                              "model_config.rmae.mae_vit.params.region_sample_type=random_fg"]) == 0
    assert [n.shape[0] for n in loader_noise] == [8, 8, 4]
    for step, noise in enumerate(loader_noise):
        assert torch.equal(seen[step], noise)  # also the pictures': their regions were drawn for that mask
    assert all(math.isfinite(r["loss"]) for r in log_records(run) if "loss" in r)


def _in_a_one_rank_group(tmp_path, body: str) -> None:
    """Runs ``body`` (Python source) in a fresh process inside a gloo process group of one rank, with ``torch``,
    ``nn``, ``copy``, ``rdist`` and ``build_model`` imported; it passes when the process exits 0."""
    script = tmp_path / "one_rank.py"
    script.write_text(
        "import copy, os, sys, torch, torch.distributed as dist, torch.nn as nn\n"
        "from rmae import distributed as rdist\n"
        "from rmae.models import build_model\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(rdist.free_port()))\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        + body +
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_sharded_bf16_model_keeps_the_masking_noise_in_fp32(tmp_path):
    """FSDP2 with bf16 parameters must not cast the forward inputs: noise rounded to bf16 ties, and argsort then
    keeps other patches than one process does (about 7% of ViT-B images per step)."""
    _in_a_one_rank_group(tmp_path, (
        "m = build_model('rmae_tiny_patch16', 'mae', img_size=32, patch_size=4, depth=1, kernel_impl='reference')\n"
        "rdist.shard_model(m, param_dtype=torch.bfloat16)\n"
        "n = m.num_patches\n"
        "noise = (0.5 + torch.arange(n, 0, -1) * 1e-6).repeat(2, 1)  # descending in fp32, all 0.5 in bf16\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    out = m(torch.randn(2, 3, 32, 32), None, noise=noise, mask_ratio=0.75)\n"
        "assert torch.equal(out.ids_restore, torch.argsort(torch.argsort(noise, 1), 1))\n"
        "assert torch.isfinite(out.loss).item()\n"))


def test_sharded_bf16_model_keeps_the_residual_stream_in_fp32(tmp_path):
    """Under FSDP2's bf16 policy only the blocks' weights are bf16: the embeddings, position tables and tokens
    stay fp32, so each block gets the same input dtype as on one process under autocast (the residual stream was
    bf16 through every block), and the loss is one process's."""
    _in_a_one_rank_group(tmp_path, (
        "torch.manual_seed(0)\n"
        "one = build_model('rmae_tiny_patch16', 'rmae', img_size=32, patch_size=4, depth=2, kernel_impl='reference')\n"
        "sharded = rdist.shard_model(copy.deepcopy(one), param_dtype=torch.bfloat16)\n"
        "g = torch.Generator().manual_seed(1)\n"
        "imgs, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, one.num_patches, generator=g)\n"
        "maps = (torch.rand(2, 8, 32, 32, generator=g) < 0.3).to(torch.uint8)\n"
        "results = []\n"
        "for m in (one, sharded):\n"
        "    seen = []\n"
        "    for name, mod in m.named_modules():\n"
        "        if isinstance(mod, nn.ModuleList):\n"
        "            for b in mod:\n"
        "                b.register_forward_pre_hook(lambda _, args, n=name: seen.append((n, str(args[0].dtype))))\n"
        "    with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "        results.append((seen, m(imgs, maps, noise=noise, mask_ratio=0.75).loss.item()))\n"
        "print(results)\n"
        "(seen_one, loss_one), (seen_sharded, loss_sharded) = results\n"
        "assert ('blocks', 'torch.float32') in seen_one\n"
        "assert seen_one == seen_sharded and abs(loss_one - loss_sharded) < 1e-5\n"))


def test_overrides_of_another_models_section_are_warned_about(capsys):
    """--model mae reads model_config.mae: model_config.rmae.* set on the command line does nothing (the run was
    a ViT-B at 224 px instead of the tiny model asked for, without a word); so for another dataset's section."""
    from rmae.train import main

    assert main(["--model", "mae", "model_config.rmae.mae_vit.params.img_size=32", "--print-config"]) == 0
    err = capsys.readouterr().err
    assert "warning: the overrides of model_config.rmae.* have no effect: this run reads model_config.mae" in err
    assert main(["--model", "rmae", "model_config.rmae.mae_vit.params.img_size=32", "--print-config"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["dataset_config.coco_pretrain.sampler=shard", "--print-config"]) == 0  # the demo reads sample
    err = capsys.readouterr().err
    assert "warning: the overrides of dataset_config.coco_pretrain.* have no effect: this run reads " \
           "dataset_config.sample_pretrain" in err
    assert main(["--dataset", "coco", "dataset_config.coco_pretrain.sampler=shard", "--print-config"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_resume_with_another_run_length_or_batch_says_so(tmp_path):
    """Extending a run (training.max_update) or changing its batch is allowed on resume, but the lr schedule and
    the data per update change from there: a warning and a log event name each setting (only the lr was)."""
    run = tmp_path / "run"
    train(cfg_for(run, "training.max_update=2"))
    train(cfg_for(run, "training.max_update=3", "training.batch_size=4", "training.seed=7",
                  f"dataset_config.sample_pretrain.data_dir={tmp_path}"))
    (event,) = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
                if '"run_settings_changed"' in line]
    assert event["changed"] == ["training.max_update: 2 in the checkpoint, 3 now",
                                "training.batch_size: 8 in the checkpoint, 4 now",
                                "training.seed: 0 in the checkpoint, 7 now",  # (T_max is set apart: 40)
                                # other data in a folder of its own name (training.save_dir): said, not refused
                                f"dataset_config.sample_pretrain.data_dir: None in the checkpoint, {str(tmp_path)!r} now"]


def test_data_warnings_format_keeps_the_users_formatter_for_others():
    """The console format applies to rmae.data's warnings only; others go to the formatter in place when the run
    started (one installed after importing rmae.train included)."""
    import rmae.train as rt

    mine = lambda message, category, filename, lineno, line=None: f"[mine] {message}\n"  # noqa: E731
    fmt = rt.console_warnings(mine)
    assert fmt("hello", UserWarning, "x.py", 1) == "[mine] hello\n"
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING skipping sample: x\n", fmt("skipping sample: x", RuntimeWarning,
                                                                           "rmae.data", 0))


def test_ranks_agree_on_resume_errors_and_on_files_only_rank_0_sees(tmp_path):
    """On several nodes a rank may not see the run folder rank 0 writes (a node's own disk, a relative save_dir
    from another working directory): every rank must reach the same error, not go on into a collective alone
    (NCCL would wait there for 30 minutes). Two gloo ranks, each in its own working directory."""
    script = tmp_path / "agree.py"
    script.write_text(
        "import os, sys, pickle, threading, torch, torch.distributed as dist, torch.multiprocessing as mp\n"
        "from pathlib import Path\n"
        "from rmae import checkpoint as ckpt, distributed as rdist\n"
        "def outcome(fn):\n"
        "    try:\n"
        "        fn()\n"
        "        return 'ok'\n"
        "    except Exception as e:\n"
        "        return f'{type(e).__name__}: {e}'\n"
        "def fail_on_1():\n"
        "    if dist.get_rank() == 1:\n"
        "        raise ValueError('only rank 1')\n"
        "def unpicklable_on_1():\n"
        "    if dist.get_rank() == 1:\n"
        "        raise OSError(threading.Lock(), 'holds a lock')\n"
        "class Custom(Exception):\n"
        "    def __init__(self, a, b):\n"
        "        super().__init__(f'{a} and {b}')\n"
        "def custom_on_1():\n"
        "    if dist.get_rank() == 1:\n"
        "        raise Custom('pickles', 'does not unpickle')\n"
        "def worker(rank, root, port):\n"
        "    os.chdir(Path(root) / f'node{rank}')\n"
        "    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)\n"
        "    results = [outcome(lambda: rdist.on_every_rank(fail_on_1)),\n"
        "               outcome(lambda: rdist.on_every_rank(unpicklable_on_1)),\n"
        "               outcome(lambda: ckpt.read_on_all_ranks('only0.pt')),\n"
        "               outcome(lambda: ckpt.read_on_all_ranks('nowhere.pt', what='training.resume_file')),\n"
        "               outcome(lambda: ckpt.read_latest('run', rank == 0)),\n"
        "               rdist.on_every_rank(lambda: rank * 10),\n"
        "               outcome(lambda: rdist.on_every_rank(custom_on_1))]\n"
        "    if rank == 1:  # the archive's checksums: read by rank 0 alone\n"
        "        ckpt.damaged_member = lambda path: (_ for _ in ()).throw(AssertionError('rank 1 read the file'))\n"
        "    results.append(outcome(lambda: ckpt.read_on_all_ranks(Path(root) / 'damaged.pt')))\n"
        "    results.append(ckpt.read_on_all_ranks(Path(root) / 'intact.pt')['step'])\n"
        "    model = torch.nn.Linear(2, 2)\n"
        "    results.append(outcome(lambda: ckpt.save_checkpoint('blocked', model=model, step=1, extra={},\n"
        "        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), is_main=rank == 0)))\n"
        "    (Path(root) / f'result{rank}.pkl').write_bytes(pickle.dumps(results))\n"
        "    dist.destroy_process_group()\n"
        "if __name__ == '__main__':\n"
        "    mp.spawn(worker, args=(sys.argv[1], rdist.free_port()), nprocs=2)\n")
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    (tmp_path / "node0" / "only0.pt").write_bytes(b"x")
    (tmp_path / "node0" / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "node0" / "run" / "checkpoints" / "ckpt_00000005.pt").write_bytes(b"x")
    for name in ("intact.pt", "damaged.pt"):  # a file system both ranks share
        torch.save({"model": {"w": torch.arange(4096.0)}, "step": 7, "version": ckpt.FORMAT_VERSION}, tmp_path / name)
    with open(tmp_path / "damaged.pt", "r+b") as f:
        f.seek((tmp_path / "damaged.pt").stat().st_size // 2)
        f.write(b"\x7f" * 64)
    (tmp_path / "node0" / "blocked").mkdir()
    (tmp_path / "node0" / "blocked" / "checkpoints").write_text("a file where rank 0 writes its checkpoints")
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [pickle.loads((tmp_path / f"result{rank}.pkl").read_bytes()) for rank in (0, 1)]
    for rank, (failed, unpicklable, only0, nowhere, latest, value, custom, damaged, intact, save) in enumerate(results):
        assert re.fullmatch(r"CorruptCheckpoint: checkpoint \S*damaged\.pt is damaged: its part \S+ does not match "
                            r"its checksum", damaged) and intact == 7
        assert failed == "ValueError: only rank 1"
        assert unpicklable.startswith("OSError") if rank == 1 else unpicklable.startswith("RuntimeError: OSError on rank 1")
        assert only0.startswith("CheckpointError: checkpoint only0.pt is there for rank 0") and "not for rank 1 on" in only0
        assert nowhere == "FileNotFoundError: training.resume_file nowhere.pt does not exist"
        assert latest.startswith("CheckpointError: checkpoint run/checkpoints/ckpt_00000005.pt is there for rank 0")
        assert value == 10 * rank  # (no error: each rank keeps its own result)
        assert custom == ("Custom: pickles and does not unpickle" if rank == 1
                          else "RuntimeError: Custom on rank 1: pickles and does not unpickle")
        assert save.startswith("FileExistsError")  # rank 0's failed write is every rank's error (none waits)
    assert (tmp_path / "node0" / "run" / "checkpoints" / "ckpt_00000005.pt").is_file()  # not renamed *.corrupt


@contextlib.contextmanager
def _as_a_spawned_rank(monkeypatch):
    """For ``_spawned`` called in this process: the variables spawn_env sets, and Ctrl-C's handler, which the rank
    resets, are restored afterwards."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def test_spawned_ranks_share_the_cores(monkeypatch):
    """Ranks that ``python -m rmae.train`` spawns split the cores between them (each took all of them: four ranks
    on 16 cores ran 64 threads), unless OMP_NUM_THREADS says otherwise; the start record shows the count."""
    import rmae.cores as cores
    import rmae.train as train_module

    seen, exits = [], []
    monkeypatch.setattr(train_module, "train", lambda cfg, require_resume: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(train_module.rdist, "exit_rank", exits.append)  # (ends the process)
    monkeypatch.setattr(cores, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        with _as_a_spawned_rank(monkeypatch):
            train_module._spawned(1, 4, 12345, "{}", False)
            torch.set_num_threads(3)
            monkeypatch.setenv("OMP_NUM_THREADS", "3")
            train_module._spawned(1, 4, 12345, "{}", False)
    finally:
        torch.set_num_threads(before)
    assert seen == [4, 3] and exits == [0, 0]


@pytest.mark.parametrize("raised, status, printed", [
    (FileNotFoundError("--resume: no checkpoint"), 2, "error (rank 1): --resume: no checkpoint"),
    (KeyboardInterrupt(), 130, ""),  # (rank 0 prints the advice; the others are quiet)
    (ZeroDivisionError("a bug"), 1, "ZeroDivisionError: a bug"),  # (the end of its traceback)
])
def test_a_spawned_rank_ends_with_its_own_status(monkeypatch, capsys, raised, status, printed):
    """A spawned rank ends through ``exit_rank`` with the status one process would return (2 for a user error,
    130 for a second Ctrl-C), after the error's traceback is gone (it holds the run's frames)."""
    import rmae.train as train_module

    def fails(cfg, require_resume):
        raise raised

    exits = []
    monkeypatch.setattr(train_module, "train", fails)
    monkeypatch.setattr(train_module.rdist, "exit_rank", lambda s: exits.append((s, sys.exc_info()[0])))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    with _as_a_spawned_rank(monkeypatch):
        train_module._spawned(1, 2, 12345, "{}", False)
    assert exits == [(status, None)]
    err = capsys.readouterr().err.strip()
    assert err.endswith(printed) if printed else err == ""


def test_a_rank_process_ends_without_finalization(tmp_path):
    """``exit_rank`` flushes what the rank printed and exits with the status at once: the interpreter's
    finalization, where FSDP2's leftover gloo group could abort the process, does not run (no atexit handler)."""
    script = ("import atexit, sys\n"
              "from rmae import distributed as rdist\n"
              "atexit.register(lambda: print('finalized'))\n"
              "print('to a pipe', end='')\n"  # (block-buffered: lost without the flush)
              "sys.stderr.write('error: x')\n"
              "rdist.exit_rank(2)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (2, "to a pipe", "error: x")


def test_a_refused_run_leaves_the_holders_new_folder(tmp_path, monkeypatch):
    """Two runs started at once into a new folder both see it missing; the one refused (the other holds the lock)
    must not remove the folder or the lock as a run that wrote nothing would."""
    import pathlib

    run = tmp_path / "new"
    with ckpt.hold_run_folder(run):
        real_exists = pathlib.Path.exists
        monkeypatch.setattr(pathlib.Path, "exists", lambda self, **kw: False if self == run else real_exists(self))
        with pytest.raises(ckpt.RunFolderInUse):
            with ckpt.hold_run_folder(run):
                pass
        monkeypatch.undo()
        assert (run / ckpt.RUN_LOCK).is_file()
    assert not run.exists()  # the holder wrote nothing: its folder goes when it ends


def test_a_forked_child_does_not_keep_the_run_folder_lock(tmp_path):
    """A run's forked children (DataLoader workers) do not share its lock: when the run is killed (SIGKILL, an OOM
    kill) while a child still lives, a restart into the folder is not refused in the name of the dead run."""
    run = tmp_path / "run"
    script = ("import os, sys, time\n"
              "from rmae import checkpoint as ckpt\n"
              f"with ckpt.hold_run_folder({str(run)!r}):\n"
              "    child = os.fork()\n"
              "    if child == 0:\n"
              "        time.sleep(60)\n"
              "        os._exit(0)\n"
              "    print(child, flush=True)\n"
              "    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(ckpt.RunFolderInUse, match=rf"pid {holder.pid} "):
            with ckpt.hold_run_folder(run):
                pass
        holder.kill()
        holder.wait(timeout=60)
        os.kill(child, 0)  # still alive
        with ckpt.hold_run_folder(run):
            assert (run / ckpt.RUN_LOCK).read_text().startswith(f"pid {os.getpid()} ")
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_the_command_of_a_rank_ends_through_exit_rank(monkeypatch, capsys):
    """The command line's entry (``command``) ends a torchrun or srun rank (a process that joined a group) through
    ``exit_rank`` with main's status, or 1 after an unexpected error (its traceback printed); one process gets
    the status back, or the error. ``main`` itself always returns (a script may call it and go on)."""
    import rmae.train as train_module

    exits = []
    monkeypatch.setattr(train_module.rdist, "exit_rank", exits.append)
    assert train_module.command(["--print-config"]) == 0 and exits == []
    monkeypatch.setattr(train_module.rdist, "_joined_a_group", True)
    assert train_module.main(["--print-config"]) == 0 and exits == []
    train_module.command(["--print-config"])
    train_module.command(["no_such_key=1"])

    def bug(argv=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train_module, "_main", bug)
    train_module.command([])
    assert exits == [0, 2, 1]
    assert "ZeroDivisionError: a bug" in capsys.readouterr().err
    monkeypatch.setattr(train_module.rdist, "_joined_a_group", False)
    with pytest.raises(ZeroDivisionError):
        train_module.command([])


@pytest.mark.parametrize("load, cpus, threads, expected", [
    (1.2, 2, 2, 1), (0.4, 2, 2, 2), (5.0, 2, 2, 1), (4.0, 16, 8, 8), (10.3, 16, 16, 6), (None, 2, 2, 2)])
def test_a_cpu_run_leaves_the_cores_other_jobs_use(monkeypatch, load, cpus, threads, expected):
    """Torch threads beside other jobs wait on each other at every op (a demo step: 9 s on 2 threads beside one
    busy job, 0.5 s on 1): a CPU run takes the cores the load average leaves, at least one."""
    import rmae.cores as cores

    def loadavg():
        if load is None:
            raise OSError("no load average")
        return (load, load, load)

    monkeypatch.setattr(cores.os, "getloadavg", loadavg)
    monkeypatch.setattr(cores.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(cores, "_cpu_times", lambda cpus: (_ for _ in ()).throw(OSError("no /proc/stat")))
    got, note = cores.threads_beside_other_jobs(threads)
    assert got == expected and (note is None) == (expected == threads)
    if note:
        assert f"about {load:.1f} of this process's {cpus} cores busy" in note
        assert f"on {expected} torch thread" in note


def test_busy_cores_take_the_smaller_of_the_load_average_and_a_sample(monkeypatch):
    """A job that just ended still weighs in the 1-minute load average, and a job pausing for a moment does not
    show in a short sample: the smaller of the two counts (here on 4 cores). A process held to some of the CPUs
    (taskset, a cgroup's cpuset) counts those only: the host's load average is left out."""
    import rmae.cores as cores

    def sampled(*readings):
        values = iter(readings)
        return lambda cpus: next(values)

    monkeypatch.setattr(cores.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cores.time, "sleep", lambda s: None)
    monkeypatch.setattr(cores, "_cpu_times", sampled((1000, 4000), (1300, 4400)))  # 300 of 400 jiffies: 3 cores
    monkeypatch.setattr(cores.os, "getloadavg", lambda: (3.6, 3.0, 2.0))
    assert cores.busy_cores() == pytest.approx(3.0)
    monkeypatch.setattr(cores, "_cpu_times", sampled((1000, 4000), (1300, 4400)))
    monkeypatch.setattr(cores.os, "getloadavg", lambda: (0.4, 3.0, 2.0))
    assert cores.busy_cores() == pytest.approx(0.4)
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {2, 3})  # two of the four
    monkeypatch.setattr(cores, "_cpu_times", sampled((100, 2000), (110, 2200)))  # 10 of 200: 0.1 of 2 cores
    assert cores.busy_cores() == pytest.approx(0.1)
    monkeypatch.setattr(cores, "_cpu_times", lambda cpus: (_ for _ in ()).throw(OSError("no /proc/stat")))
    assert cores.busy_cores() is None  # (the load average is the host's: not used)
    assert cores.threads_beside_other_jobs(2) == (2, None)


def test_cpu_times_read_the_cpus_asked_for(tmp_path, monkeypatch):
    """/proc/stat's per-CPU lines: busy = all fields but idle and iowait, summed over the CPUs asked for."""
    import builtins

    import rmae.cores as cores

    stat = tmp_path / "stat"
    stat.write_text("cpu  30 0 30 300 10 0 0 0 0 0\ncpu0 10 0 10 100 5 0 0 0 0 0\n"
                    "cpu1 20 0 20 200 5 0 0 0 0 0\nintr 12345\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open",
                        lambda path, *a, **k: real_open(stat if path == "/proc/stat" else path, *a, **k))
    assert cores._cpu_times({1}) == (40, 245)
    assert cores._cpu_times(None) == (60, 370)


def test_main_trains_beside_busy_cores_on_fewer_threads(tmp_path, monkeypatch, capsys):
    """``python -m rmae.train`` on a CPU whose cores other jobs use: fewer threads, said on the console and in the
    start record; the process's thread count is restored afterwards (main() called in a process)."""
    import rmae.cores as cores
    from rmae.train import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "busy_cores", lambda: 1.4)
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main([*BASE, f"training.save_dir={tmp_path / 'run'}", "training.max_update=1",
                     "training.device=cpu"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "training on 1 torch thread instead of 2" in capsys.readouterr().err
    assert log_records(tmp_path / "run", "start")[0]["threads"] == 1


def test_a_gpu_waiting_for_its_loader_is_told_what_to_do():
    """A log window in which the GPU waits for data more than a fifth of each update: the warning names the time,
    the workers and the cores, and offline masks when FH runs while loading."""
    from rmae.train import data_bound_warning

    assert data_bound_warning(0.01, 0.2, 4, 16, "offline") is None  # 5%: the loader keeps up
    assert data_bound_warning(0.0, 0.0, 4, 16, "offline") is None
    message = data_bound_warning(0.1, 0.25, 4, 16, "online_crop")
    assert message.startswith("the GPU waits for data 0.1 s of each 0.25 s update (40%): raise "
                              "training.num_workers (now 4; this rank may use 16 cores, so up to about 15 workers)")
    assert "offline FH masks" in message
    message = data_bound_warning(0.1, 0.25, 15, 16, "offline")
    assert "already uses this rank's 16 cores" in message and "offline FH masks" not in message


def test_cores_per_rank_shares_the_node(monkeypatch):
    """The data-bound advice counts this rank's cores: torchrun's and the spawned ranks share one affinity
    (LOCAL_WORLD_SIZE of them), Slurm tasks get SLURM_CPUS_PER_TASK."""
    import rmae.cores as cores

    monkeypatch.setattr(cores, "usable_cores", lambda: 64)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores.cores_per_rank() == 64
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cores.cores_per_rank() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")
    assert cores.cores_per_rank() == 12
