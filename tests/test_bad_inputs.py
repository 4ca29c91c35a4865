"""Bad inputs that used to give tracebacks or wrong runs (issue 27): unreadable files and folders, values that
pass a range check and fail later, labels outside the classes, symlink loops. Each is one PCLError line.

Tests run as root, which can read everything: a permission-denied file is simulated by making ``open`` /
``os.open`` / ``os.scandir`` raise ``PermissionError(EACCES)`` for that one path."""

import argparse
import builtins
import errno
import os

import pytest
import torch
from PIL import Image

from pcl import PCLError

DENIED = r": Permission denied$"


def deny(monkeypatch, module, name, target):
    """Make ``module.name(path, ...)`` raise EACCES for ``target`` (a path, or a folder and what is under it)."""
    real = getattr(module, name)
    target = str(target)

    def refuse(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(str(path)).startswith(target):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, refuse)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_unreadable_config_file_is_one_line(tmp_path, monkeypatch):
    from pcl.settings import load_config_defaults

    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.1\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float)
    deny(monkeypatch, builtins, "open", cfg)
    with pytest.raises(PCLError, match=f"cannot read {cfg}{DENIED}") as err:
        load_config_defaults(parser, str(cfg))
    one_line(err)


def test_unreadable_class_list_and_subset_list(tmp_path, monkeypatch):
    from pcl.data import read_class_list, read_subset

    classes, subset = tmp_path / "classes.txt", tmp_path / "1percent.txt"
    classes.write_text("a\nb\n")
    subset.write_text("a/0.png\n")
    deny(monkeypatch, builtins, "open", classes)
    with pytest.raises(PCLError, match=f"cannot read {classes}{DENIED}"):
        read_class_list(str(classes))
    monkeypatch.undo()
    deny(monkeypatch, builtins, "open", subset)
    with pytest.raises(PCLError, match=f"cannot read {subset}{DENIED}"):
        read_subset(str(tmp_path / "train"), [(str(tmp_path / "train" / "a" / "0.png"), 0)], str(subset))


def test_unreadable_checkpoint_is_one_line(tmp_path, monkeypatch):
    from pcl.checkpoint import load_checkpoint

    path = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 1}, path)
    deny(monkeypatch, builtins, "open", path)
    with pytest.raises(PCLError, match=f"cannot read {path}{DENIED}") as err:
        load_checkpoint(str(path))
    one_line(err)
    monkeypatch.undo()
    assert load_checkpoint(str(path)) == {"epoch": 1}


def test_unlistable_data_root_is_one_line(tmp_path, monkeypatch):
    from pcl.data import image_folder

    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "0.png")
    deny(monkeypatch, os, "scandir", tmp_path / "train")
    with pytest.raises(PCLError, match=f"cannot read {tmp_path / 'train'}{DENIED}"):
        image_folder(str(tmp_path), "train")


def test_unreadable_voc07_and_places205_lists(tmp_path, monkeypatch):
    from pcl.data.transfer import VOC_CLASSES, VOC07, Places205

    main = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages").mkdir()
    for cls in VOC_CLASSES:
        (main / f"{cls}_trainval.txt").write_text("000001  1\n")
    denied = main / "bird_trainval.txt"
    deny(monkeypatch, builtins, "open", denied)
    with pytest.raises(PCLError, match=f"cannot read {denied}{DENIED}"):
        VOC07(str(tmp_path), "trainval")
    monkeypatch.undo()
    assert len(VOC07(str(tmp_path), "trainval")) == 1

    (tmp_path / "trainvalsplit_places205").mkdir()
    (tmp_path / "data" / "vision" / "torralba" / "deeplearning" / "images256").mkdir(parents=True)
    csv = tmp_path / "trainvalsplit_places205" / "train_places205.csv"
    csv.write_text("a/abbey/0.jpg 0\n")
    deny(monkeypatch, builtins, "open", csv)
    with pytest.raises(PCLError, match=f"cannot read {csv}{DENIED}"):
        Places205(str(tmp_path), "train")


@pytest.mark.parametrize("name", ["backbone.pth", "backbone.pkl"])
def test_unwritable_export_target_is_one_line(tmp_path, monkeypatch, capsys, name):
    from pcl import export
    from pcl.launch import run_cli

    ckpt, folder = tmp_path / "ckpt.pth.tar", tmp_path / "ro"
    ckpt.write_bytes(b"unused: the backbone is stubbed")
    folder.mkdir()
    monkeypatch.setattr(export, "torchvision_state", lambda path, arch=None: {"conv1.weight": torch.zeros(1)})
    deny(monkeypatch, os, "open", folder)  # mkstemp
    deny(monkeypatch, builtins, "open", folder)
    assert run_cli(export.build_export_parser, export.run_export, [str(ckpt), str(folder / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {folder / name}: Permission denied"
    assert os.listdir(folder) == []


def test_seed_beyond_64_bits_is_refused():
    from pcl.settings import check_ranges

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int)
    check_ranges(parser, parser.parse_args(["--seed", str(2 ** 63 - 1)]))
    for bad in (2 ** 63, 2 ** 70):
        with pytest.raises(PCLError, match=f"--seed {bad}: must be >= 0 and below 2\\*\\*63"):
            check_ranges(parser, parser.parse_args(["--seed", str(bad)]))


@pytest.mark.parametrize("arch", ["_resnet", "ResNet", "resnet", "ResNet18_Weights", "resnet18_weights"])
def test_private_torchvision_names_are_not_architectures(arch):
    from pcl.model import build_backbone

    with pytest.raises(PCLError, match=f"unknown architecture '{arch}': choose a torchvision ResNet \\(.*resnet18"):
        build_backbone(arch)


def test_public_builders_are_architectures():
    from pcl.model import build_backbone

    with pytest.raises(PCLError, match=r"choose a torchvision ResNet \((.*)\)$") as refused:
        build_backbone("no_such_arch")  # the refusal lists every architecture build_backbone takes
    offered = str(refused.value).rsplit("(", 1)[1].rstrip(")").split(", ")
    for arch in ("resnet18", "resnet152", "wide_resnet50_2", "resnext50_32x4d"):
        assert arch in offered, offered
    assert build_backbone("resnet18", width=4, stem="small").feature_dim == 32  # and an offered one builds


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_sample_per_split_on_1x1_maps_names_the_flags(channels_last):
    from pcl.model import SplitBatchNorm

    bn = SplitBatchNorm(4, 2).train()
    x = torch.randn(2, 4, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(PCLError, match=r"--bn-splits 2 with a batch of 2 .*1x1.*lower --bn-splits or raise the batch"):
        bn(x)
    with pytest.raises(PCLError, match=r"--bn-splits 1 with a batch of 1 .*raise the batch size"):
        SplitBatchNorm(4, 1).train()(torch.randn(1, 4, 1, 1))
    assert bn(torch.randn(4, 4, 1, 1)).shape == (4, 4, 1, 1)  # two per split: fine
    assert bn.eval()(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


def test_idx_label_outside_the_classes_is_refused(tmp_path):
    from pcl.data import load_mnist_family, write_idx

    write_idx(str(tmp_path / "train-images-idx3-ubyte"), torch.zeros(3, 28, 28, dtype=torch.uint8))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte"), torch.tensor([1, 12, 3], dtype=torch.uint8))
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), torch.zeros(2, 28, 28, dtype=torch.uint8))
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), torch.tensor([0, 9], dtype=torch.uint8))
    labels = tmp_path / "train-labels-idx1-ubyte"
    with pytest.raises(PCLError, match=f"{labels}: label 12 \\(image 1\\) is outside the 10 classes 0-9") as err:
        load_mnist_family("mnist", str(tmp_path))
    one_line(err)
    write_idx(str(labels), torch.tensor([1, 9, 3], dtype=torch.uint8))
    assert load_mnist_family("mnist", str(tmp_path))["train_labels"].tolist() == [1, 9, 3]


def test_symlink_loop_in_a_class_folder_is_refused(tmp_path):
    from pcl.data import image_folder

    for c in ("a", "b"):
        (tmp_path / "train" / c / "sub").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / "0.png")
    os.symlink(tmp_path / "train" / "b", tmp_path / "train" / "a" / "to_b")  # no loop: b's images once more
    assert len(image_folder(str(tmp_path), "train")) == 3
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "a" / "sub" / "up")
    with pytest.raises(PCLError, match=r"train/a/sub/up links back to .*train/a \(a symlink loop") as err:
        image_folder(str(tmp_path), "train")
    one_line(err)


def test_every_seed_in_range_seeds_every_stream():
    """NF17: --seed 10**12 passed the range check, then 'Overflow when unpacking long long' in manual_seed."""
    from pcl.data.loaders import epoch_seed, stream_seed, worker_seed

    for seed in (10 ** 12, 2 ** 63 - 1):
        for value in (epoch_seed(seed, 199), epoch_seed(seed, 199, 7, 3), stream_seed(seed, 199, 7, 2),
                      worker_seed(seed, 199, 7)):
            torch.Generator().manual_seed(value)
    assert epoch_seed(5, 3, 2, 1) == (5 * 100_003 + 3) * 1009 + 3 and stream_seed(5, 3, 2, 1) == \
        ((5 * 1_000_003 + 3) * 1009 + 2) * 17 + 1  # the seeds earlier runs were drawn with


def test_compile_on_the_cpu_with_narrow_convs_is_refused_before_the_data():
    """WF09: --compile on the CPU at --width 4 died of a segmentation fault in oneDNN (no message). The decision
    only: nothing is compiled here."""
    from pcl.model import cpu_compile_problem

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert "its narrowest 1x1 stride-2 convolution has 4 input channels" in \
        cpu_compile_problem("resnet18", 4, "small", cpu, "AVX2")
    assert cpu_compile_problem("resnet18", 8, "small", cpu, "AVX2") is None  # trained on AVX2 in the probe
    assert "use --width 16 or more" in cpu_compile_problem("resnet18", 8, "small", cpu, "AVX512")
    assert cpu_compile_problem("resnet50", 4, "small", cpu, "AVX512") is None  # bottlenecks: 4 x 4 channels
    assert cpu_compile_problem("resnet18", 4, "small", gpu, "AVX2") is None


def test_fit_refuses_an_unsafe_cpu_compile_before_reading_the_data(tmp_path):
    from conftest import tiny_args
    from pcl.engine import fit

    with pytest.raises(PCLError, match=r"^--compile on the CPU with -a resnet18 --width 4"):
        fit(tiny_args(tmp_path, "--compile", "--dataset", "imagefolder", str(tmp_path / "no_such_data")))
