"""What a run records of itself and says about its settings: EXP_DIR/config.yaml (the resolved settings, which -c
reads back and which reproduce the run), the versions line in train.log, MoCo-only runs, a resume with another
schedule, settings far from the size of the data."""

import json

import numpy as np
import yaml

from conftest import copy_run, tiny_args
from pcl.config import build_pretrain_parser, parse_args, resolved_settings, validate_pretrain_args


def first_epoch(exp_dir):
    return json.loads((exp_dir / "log.txt").read_text().splitlines()[0])


def test_a_rerun_from_config_yaml_gives_the_same_first_epoch_loss_bit_for_bit(tiny_run_1ep, tmp_path):
    from pcl.engine import fit

    written = yaml.safe_load((tiny_run_1ep / "config.yaml").read_text())
    assert written["exp_dir"] == str(tiny_run_1ep) and written["num_cluster"] == [10, 20] and "config" not in written
    fit(parse_args(build_pretrain_parser(), ["-c", str(tiny_run_1ep / "config.yaml"), "--exp-dir", str(tmp_path)]))
    before, again = first_epoch(tiny_run_1ep), first_epoch(tmp_path)
    for key in ("loss", "loss_inst", "acc_inst", "lr"):
        assert again[key] == before[key], key  # bit for bit: JSON floats round-trip exactly


def test_every_written_key_is_one_that_c_accepts_and_reads_back_as_it_was(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("a\n")
    argv = [str(tmp_path / "data"), "--class-list", str(tmp_path / "classes.txt"), "--num-cluster", "30,60",
            "--schedule", "3", "7", "--lr", "0.0123456789", "--wd", "3e-05", "--seed", "7", "--no-mlp", "--cos",
            "--amp", "bf16", "--knn-every", "2", "--crop-min-scale", "0.35", "--bn-splits", "4", "-j", "0"]
    cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), argv))
    settings = resolved_settings(cfg)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    again = validate_pretrain_args(parse_args(build_pretrain_parser(), ["-c", str(tmp_path / "run.yaml")]))
    assert resolved_settings(again) == settings
    assert again.num_cluster == (30, 60) and again.lr == 0.0123456789 and again.seed_given


def test_train_log_starts_with_the_versions(tiny_run):
    first = (tiny_run / "train.log").read_text().splitlines()[0]
    import torch
    import torchvision

    assert f"torch {torch.__version__}" in first and f"torchvision {torchvision.__version__}" in first
    assert "faiss" in first and ("CUDA" in first or "CPU build of torch" in first)
    assert "commit " in first or "not a git checkout" in first


def test_warmup_at_or_past_epochs_warns_once_and_the_start_line_says_moco_only(tiny_run_1ep):
    log = (tiny_run_1ep / "train.log").read_text()
    assert log.count("no E-step will run") == 1 and "--warmup-epoch 1 is not below --epochs 1" in log
    assert "MoCo only (no E-step): resnet18" in log and "] PCL: " not in log


def test_resuming_with_another_schedule_names_the_old_and_the_new(tiny_run_1ep, tmp_path):
    from pcl.engine import fit

    exp = copy_run(tiny_run_1ep, tmp_path / "run")
    fit(tiny_args(exp, "--resume", "auto", "--epochs", "2"))
    log = (exp / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "with another schedule" in ln)
    assert "--epochs 1 -> --epochs 2" in line and "warmup" not in line


def test_a_resume_trains_with_the_weight_decay_and_momentum_it_is_given(tiny_run_1ep, tmp_path):
    """The optimizer's state_dict brings back its saved hyper-parameters; the command line's --wd / --momentum win
    (the momentum buffers are the checkpoint's), as the recipe warning says."""
    import torch

    from pcl.engine import fit

    exp = copy_run(tiny_run_1ep, tmp_path / "run")
    fit(tiny_args(exp, "--resume", "auto", "--epochs", "2", "--wd", "5e-4", "--momentum", "0.8"))
    groups = torch.load(exp / "checkpoint_last.pth.tar", map_location="cpu", weights_only=False)["optimizer"]
    assert [(g["weight_decay"], g["momentum"]) for g in groups["param_groups"]] == [(5e-4, 0.8)]
    line = next(ln for ln in (exp / "train.log").read_text().splitlines() if "another recipe" in ln)
    assert "--wd 0.0001 -> --wd 0.0005" in line and "--momentum 0.9 -> --momentum 0.8" in line


def test_resuming_with_another_recipe_names_it_and_how_to_continue_unchanged(pcl_warnings):
    from pcl.resume import note_schedule_change

    cfg = validate_pretrain_args(tiny_args("unused", "--temperature", "0.5", "--hue-space", "yiq", "--aug-plus"))
    saved = {**cfg.plain(), "temperature": 0.2, "aug_plus": False, "num_cluster": [10, 30]}
    note_schedule_change({"epoch": 3, "args": saved}, "run/checkpoint_0002.pth.tar", cfg)
    assert len(pcl_warnings) == 1
    line = pcl_warnings[0]
    assert "--temperature 0.2 -> --temperature 0.5" in line and "--no-aug-plus -> --aug-plus" in line
    assert "--num-cluster 10,30 -> --num-cluster 10,20" in line and "From epoch 3" in line
    assert line.endswith("resume with --no-aug-plus, --temperature 0.2, --num-cluster 10,30")
    assert "hue" not in line and "schedule" not in line

    pcl_warnings.clear()  # a checkpoint from before --hue-space (HSV hue), resumed by a preset that now sets yiq
    old = {k: v for k, v in cfg.plain().items() if k != "hue_space"}
    note_schedule_change({"epoch": 1, "args": {**old, "unique_prototypes": True}}, "run/c0.pth.tar", cfg)
    assert len(pcl_warnings) == 1 and "--hue-space hsv -> --hue-space yiq" in pcl_warnings[0]
    assert "--unique-prototypes -> without --unique-prototypes" in pcl_warnings[0]
    assert pcl_warnings[0].endswith("resume with --hue-space hsv, --unique-prototypes")
    pcl_warnings.clear()
    note_schedule_change({"epoch": 1, "args": cfg.plain()}, "run/c0.pth.tar", cfg.replace(unique_prototypes=True))
    assert pcl_warnings[0].endswith("resume without --unique-prototypes")

    pcl_warnings.clear()  # the same settings, and the official hue on an old checkpoint: nothing to say
    note_schedule_change({"epoch": 1, "args": cfg.plain()}, "run/checkpoint_0000.pth.tar", cfg)
    note_schedule_change({"epoch": 1, "args": old}, "run/c.pth.tar", cfg.replace(hue_space="hsv"))
    note_schedule_change({"epoch": 1}, "official.pth.tar", cfg)  # official files hold no args
    assert not pcl_warnings


def test_settings_far_from_the_data_are_one_line_of_advice_each(pcl_warnings):
    from pcl.engine import _advise_on_size

    cfg = tiny_args("unused", "--pcl-r", "512", "-b", "16", "--num-cluster", "20,40,80", "--epochs", "4")
    cfg = validate_pretrain_args(cfg)
    _advise_on_size(cfg, 120)
    assert len(pcl_warnings) == 2
    assert "--pcl-r 512 is longer than the 120 training images" in pcl_warnings[0]
    assert "use --pcl-r 112" in pcl_warnings[0]
    assert "use --num-cluster 3,6,12" in pcl_warnings[1]
    pcl_warnings.clear()
    _advise_on_size(cfg.replace(pcl_r=64, num_cluster=(20, 40)), 5000)
    assert not pcl_warnings


def test_faiss_prints_no_raw_warning_for_few_points_per_cluster(capfd):
    from pcl.cluster import faiss_kmeans

    x = np.random.default_rng(0).standard_normal((30, 8)).astype("float32")
    faiss_kmeans(x, 10, seed=0, niter=5, nredo=1, gpu_device=None)
    assert "WARNING clustering" not in capfd.readouterr().err
