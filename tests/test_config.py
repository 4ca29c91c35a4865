import glob
import os
import re
import sys

import pytest

from pcl import PCLError
from pcl.config import build_pretrain_parser, load_config_defaults, parse_args, parse_num_cluster, \
    validate_pretrain_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OFFICIAL = ("-a resnet50 --lr 0.03 --batch-size 256 --temperature 0.2 --mlp --aug-plus --cos "
            "--dist-url tcp://localhost:10001 --multiprocessing-distributed --world-size 1 --rank 0 "
            "--exp-dir experiment_pcl /data/imagenet").split()


def test_official_command_line_parses():
    args = validate_pretrain_args(parse_args(build_pretrain_parser(), OFFICIAL))
    assert args.arch == "resnet50" and args.lr == 0.03 and args.batch_size == 256
    assert args.mlp and args.aug_plus and args.cos and args.multiprocessing_distributed
    assert args.dist_url == "tcp://localhost:10001" and args.world_size == 1 and args.rank == 0
    assert args.data == "/data/imagenet" and args.dataset == "imagefolder"
    # the official defaults
    assert args.num_cluster == (25000, 50000, 100000) and args.pcl_r == 16384 and args.moco_m == 0.999
    assert args.warmup_epoch == 20 and args.epochs == 200 and args.schedule == [120, 160]
    assert args.weight_decay == 1e-4 and args.momentum == 0.9 and args.low_dim == 128 and args.save_freq == 5


def test_other_official_flags():
    args = parse_args(build_pretrain_parser(), "-j 4 --start-epoch 3 --schedule 10 20 --wd 5e-4 -p 7 "
                      "--resume x.pth --seed 5 --gpu 0 --low-dim 64 --pcl-r 4096 --moco-m 0.99 "
                      "--num-cluster 10,20 --warmup-epoch 2 --dist-backend gloo d".split())
    assert (args.workers, args.start_epoch, args.schedule, args.weight_decay, args.print_freq) == (4, 3, [10, 20], 5e-4, 7)
    assert (args.resume, args.seed, args.gpu, args.low_dim, args.pcl_r, args.moco_m) == ("x.pth", 5, 0, 64, 4096, 0.99)


def test_yaml_sets_defaults_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nepochs: 7\nnum-cluster: [3, 6]\nmlp: true\n")
    args = validate_pretrain_args(parse_args(build_pretrain_parser(), ["-c", str(cfg), "--lr", "0.1", "d"]))
    assert args.lr == 0.1 and args.epochs == 7 and args.num_cluster == (3, 6) and args.mlp


def test_unknown_config_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nlearning_rat: 3\n")
    with pytest.raises(PCLError, match="unknown key 'learning_rat'"):
        parse_args(build_pretrain_parser(), ["-c", str(cfg)])


def test_every_unknown_config_key_is_named_at_once_with_the_nearest_flag(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_clusters: 10\nlr: 0.5\nwarmup-epochs: 3\nfoo_bar_baz: 1\n")
    with pytest.raises(PCLError) as err:
        parse_args(build_pretrain_parser(), ["-c", str(cfg)])
    assert str(err.value) == (f"config {cfg}: unknown key 'num_clusters' (did you mean 'num_cluster'?); unknown key "
                              f"'warmup-epochs' (did you mean 'warmup_epoch'?); unknown key 'foo_bar_baz' (valid keys "
                              f"are the command-line flags, see --help)")


@pytest.mark.parametrize("bad", ["25000,abc", "", "1", "10,,x"])
def test_malformed_num_cluster(bad):
    with pytest.raises(PCLError, match="--num-cluster"):
        parse_num_cluster(bad)


def test_shipped_configs_load():
    files = glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    assert len(files) >= 3
    parser = build_pretrain_parser()
    for f in files:
        assert load_config_defaults(parser, f)


def test_v2_config_carries_paper_settings():
    args = parse_args(build_pretrain_parser(), ["-c", os.path.join(ROOT, "configs", "pcl_v2_imagenet.yaml"), "d"])
    assert args.mlp and args.aug_plus and args.cos and args.arch == "resnet50"
    assert args.lr == 0.03 and args.batch_size == 256 and args.epochs == 200 and args.temperature == 0.2


@pytest.mark.parametrize("yaml_text, message", [
    ('mlp: "false"', "key 'mlp' is a switch: write true or false (unquoted), not 'false'"),
    ("sgd_impl: turbo", "key 'sgd_impl' must be one of auto, foreach, fused, loop, not 'turbo'"),
    ("epochs: 1.5", "key 'epochs' takes an integer, not 1.5"),
    ("dataset: cifar", "key 'dataset' must be one of"),
    ("lr: fast", "key 'lr' takes a number, not 'fast'"),
    ("schedule: [120, x]", "key 'schedule' takes an integer, not 'x'"),
    ("temperature: [0.1]", "key 'temperature' takes one value"),
])
def test_yaml_values_are_checked_like_the_command_line(tmp_path, yaml_text, message):
    """YAML values bypass argparse's type and choices: they are converted and checked the same way."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text + "\n")
    with pytest.raises(PCLError, match=re.escape(message)):
        parse_args(build_pretrain_parser(), ["-c", str(cfg), "--dataset", "demo"])


def test_yaml_values_convert_to_the_flag_types(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("epochs: 3\nlr: 1\nmlp: true\nschedule: [2, 4]\nnum_cluster: [10, 20]\nexp_dir: 7\n")
    args = parse_args(build_pretrain_parser(), ["-c", str(cfg), "--dataset", "demo"])
    assert (args.epochs, args.lr, args.mlp, args.schedule, args.exp_dir) == (3, 1.0, True, [2, 4], "7")
    assert isinstance(args.lr, float) and parse_num_cluster(args.num_cluster) == (10, 20)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr/--learning-rate -1.0: must be a finite number > 0"),
    (["--lr", "nan"], "--lr/--learning-rate nan: must be a finite number > 0"),
    (["--save-freq", "0"], "--save-freq 0: must be >= 1"),
    (["-p", "0"], "--print-freq 0: must be >= 1"),
    (["--image-size", "0"], "--image-size 0: must be >= 8 (pixels)"),
    (["--crop-min-scale", "2"], "--crop-min-scale 2.0: must be in (0, 1]"),
    (["-j", "-1"], "--workers -1: must be >= 0"),
    (["--kmeans-nredo", "0"], "--kmeans-nredo 0: must be >= 1"),
    (["--knn-k", "0"], "--knn-k 0: must be >= 1"),
    (["--temperature", "0"], "--temperature 0.0: must be a finite number > 0"),
    (["--moco-m", "1.5"], "--moco-m 1.5: must be in [0, 1]"),
])
def test_out_of_range_settings_are_one_line_errors_before_any_work(argv, message, capsys):
    from pcl.launch import run_cli

    ran = []
    code = run_cli(build_pretrain_parser, ran.append, ["--dataset", "demo", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not ran and message in err and len(err.splitlines()) == 1


def test_every_numeric_flag_of_every_entry_point_has_a_range():
    """Each int/float flag of the six commands is checked (RANGES) or is free by design (none today)."""
    from pcl.config import RANGES, build_linear_parser, build_svm_parser
    from pcl.evaluation import cluster_metrics, knn, semisup, visualize

    parsers = [build_pretrain_parser(), build_linear_parser(), build_svm_parser(), knn.build_parser(),
               cluster_metrics.build_parser(), semisup.build_parser(), visualize.build_parser()]
    unchecked = {a.dest for p in parsers for a in p._actions
                 if a.type in (int, float) and a.dest not in RANGES and a.choices is None}
    assert unchecked == set(), unchecked


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            return len(text)

    assert parse_args(build_pretrain_parser(), ["--dataset", "demo"]).no_progress  # pytest's captured stderr
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not parse_args(build_pretrain_parser(), ["--dataset", "demo"]).no_progress
    assert parse_args(build_pretrain_parser(), ["--dataset", "demo", "--no-progress"]).no_progress


@pytest.mark.parametrize("build", ["build_pretrain_parser", "build_linear_parser", "build_svm_parser"])
def test_help_gives_every_flag_a_text_and_one_default(build):
    import pcl.config as config

    parser = getattr(config, build)()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"{action.option_strings} has no help text"
        assert text.count("default") <= 1, f"{action.option_strings}: {text}"


def test_one_process_commands_leave_the_launchers_flags_out_of_help():
    import pcl.evaluation.knn as knn
    from pcl.config import build_linear_parser, build_svm_parser

    for parser in (knn.build_parser(), build_svm_parser()):
        text = parser.format_help()
        assert "--multiprocessing-distributed" not in text and "--nproc" not in text
        assert "--dist-url" in text  # torchrun still runs them
    assert "--multiprocessing-distributed" in build_linear_parser().format_help()
