import glob
import os

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
    assert args.num_cluster == [25000, 50000, 100000] and args.pcl_r == 16384 and args.moco_m == 0.999
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
    assert args.lr == 0.1 and args.epochs == 7 and args.num_cluster == [3, 6] and args.mlp


def test_unknown_config_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nlearning_rat: 3\n")
    with pytest.raises(PCLError, match="unknown key 'learning_rat'"):
        parse_args(build_pretrain_parser(), ["-c", str(cfg)])


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
