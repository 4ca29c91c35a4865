"""The settings groups: built once from any entry point's flags, each holding what its part reads."""

import dataclasses

import pytest

from pcl.config import build_linear_parser, build_pretrain_parser, build_svm_parser, parse_args, validate_pretrain_args
from pcl.data import build_pretrain_data, data_settings
from pcl.settings import DataSettings, DistSettings, ModelSettings, OptimSettings


@pytest.mark.parametrize("parser, dataset", [(build_pretrain_parser, "imagefolder"), (build_linear_parser, "imagefolder"),
                                             (build_svm_parser, "voc07")])
def test_every_entry_point_builds_the_data_and_dist_groups_from_its_flags(parser, dataset, tmp_path):
    cfg = parse_args(parser(), [str(tmp_path), "--dataset", dataset, "-j", "3", "--image-size", "40",
                                "--crop-min-scale", "0.5", "--seed", "7", "-b", "16", "--dist-timeout", "5"])
    data = data_settings(cfg)
    assert (data.data, data.dataset, data.workers, data.workers_per_node, data.image_size, data.crop_min_scale,
            data.seed, data.batch_size) == (str(tmp_path), dataset, 3, 3, 40, 0.5, 7, 16)
    assert data.aug_plus is False  # only pretraining has two-crop views
    dist = DistSettings.of(cfg)
    assert (dist.dist_timeout, dist.seed_given, dist.local_rank, dist.multiprocessing_distributed) == (5, True, 0, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.workers = 0  # type: ignore[misc]


def test_the_data_layer_needs_only_its_group(tmp_path):
    """build_pretrain_data reads a DataSettings: no command line, no fallback for a flag it was not given."""
    cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), [
        "--dataset", "demo", "--image-size", "16", "-b", "8", "--aug-plus", "--demo-renders", "1"]))
    group = data_settings(cfg)
    assert group.aug_plus is True and group.demo_renders == 1
    data = build_pretrain_data(group)
    assert data.num_samples == 1438 and data.train_loader.batch_size == 8
    with pytest.raises(TypeError):
        DataSettings(**{f.name: getattr(group, f.name) for f in dataclasses.fields(group)[:-1]})  # every field named


def test_model_and_optim_groups_resolve_what_depends_on_the_run():
    cfg = parse_args(build_pretrain_parser(), ["--dataset", "demo", "--lr", "0.5", "--cos", "--schedule", "3", "6"])
    assert ModelSettings.of(cfg, world=1).bn_splits == 8  # one process: SplitBatchNorm stands in for shuffle-BN
    assert ModelSettings.of(cfg, world=4).bn_splits == 1  # DDP shuffles across ranks
    assert ModelSettings.of(cfg.replace(bn_splits=2), world=4).bn_splits == 2
    optim = OptimSettings.of(cfg)
    assert (optim.lr, optim.cos, optim.schedule, optim.epochs) == (0.5, True, (3, 6), cfg.epochs)
