"""ImageNet-100 style class lists, the CIFAR/STL/ImageNet-100 presets and their start-up checks."""

import os

import pytest
import torchvision.datasets as tvd

from conftest import ROOT, fake_cifar, fake_stl10, image_folder
from pcl import PCLError
from pcl.config import build_linear_parser, build_pretrain_parser, parse_args, validate_pretrain_args
from pcl.data import data_settings, ListedImageFolder, build_labelled_data, build_pretrain_data, read_class_list
from pcl.engine import fit

CONFIGS = os.path.join(ROOT, "configs")
TINY = ["--width", "4", "-b", "16", "--pcl-r", "32", "--num-cluster", "3,4", "--epochs", "2", "--warmup-epoch", "1",
        "--kmeans-nredo", "1", "--kmeans-niter", "3", "--workers", "0", "--no-progress", "--bn-splits", "2",
        "--knn-every", "0", "--no-knn-eval"]


def test_class_list_selects_and_orders_classes_the_same_in_every_split(tmp_path):
    root = image_folder(tmp_path / "data", ["n01", "n02", "n03", "n04"], per_class=2)
    (tmp_path / "list.txt").write_text("# two of four\nn03\n\nn01  # comment\n")
    args = parse_args(build_linear_parser(), [root, "--class-list", str(tmp_path / "list.txt"), "-b", "4",
                                              "--workers", "0", "--image-size", "12"])
    data = build_labelled_data(data_settings(args.replace(dataset="imagefolder")))
    assert sorted(data.train_labels.tolist()) == [0, 0, 1, 1] and data.val_labels.tolist() == data.train_labels.tolist()
    folder = ListedImageFolder(os.path.join(root, "val"), read_class_list(str(tmp_path / "list.txt")))
    assert folder.classes == ["n03", "n01"]
    assert all(os.sep + "n03" + os.sep in path for path, label in folder.samples if label == 0)


@pytest.mark.parametrize("text,message", [("n01\nn09\n", "class n09 of the class list is not a folder"),
                                          ("\n# nothing\n", "lists no classes"), ("n01\nn01\n", "lists n01 twice")])
def test_bad_class_lists_are_one_line_errors(tmp_path, text, message):
    root = image_folder(tmp_path / "data", ["n01", "n02"], per_class=1)
    (tmp_path / "list.txt").write_text(text)
    args = parse_args(build_pretrain_parser(), [root, "--class-list", str(tmp_path / "list.txt"), *TINY])
    args = validate_pretrain_args(args)
    with pytest.raises(PCLError, match=message):
        build_pretrain_data(data_settings(args))
    with pytest.raises(PCLError, match="file not found"):
        read_class_list(str(tmp_path / "absent.txt"))


def test_validation_folder_with_other_classes_is_refused(tmp_path):
    image_folder(tmp_path / "data", ["a", "b"], per_class=1, splits=("train",))
    image_folder(tmp_path / "data", ["a", "c"], per_class=1, splits=("val",))
    args = validate_pretrain_args(parse_args(build_pretrain_parser(), [str(tmp_path / "data"), *TINY]))
    with pytest.raises(PCLError, match="train/ and val/ hold different classes"):
        build_pretrain_data(data_settings(args))


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)


@pytest.mark.parametrize("preset,make,count", [
    ("pcl_cifar10", lambda root: fake_cifar(root, "cifar10", 40), 40),
    ("pcl_cifar100", lambda root: fake_cifar(root, "cifar100", 200), 200),
    ("pcl_stl10", lambda root: fake_stl10(root, n_unlabeled=40), 40),
])
def test_torchvision_presets_check_the_data_then_run(tmp_path, no_md5, preset, make, count):
    make(tmp_path / "data")
    argv = ["-c", os.path.join(CONFIGS, f"{preset}.yaml"), str(tmp_path / "data"), *TINY,
            "--exp-dir", str(tmp_path / "exp")]
    if preset == "pcl_stl10":
        argv += ["--image-size", "32"]
    args = validate_pretrain_args(parse_args(build_pretrain_parser(), argv))
    with pytest.raises(PCLError, match=f"{count} training images, the preset expects"):
        build_pretrain_data(data_settings(args))  # the real preset wants the real set: a wrong folder fails at once
    stats = fit(parse_args(build_pretrain_parser(), argv + ["--expect-images", str(count)]))
    assert stats["epoch"] == 1 and "loss_proto" in stats


def test_imagenet100_preset_reads_only_the_listed_classes(tmp_path):
    wnids = read_class_list(os.path.join(CONFIGS, "class_lists", "imagenet100.txt"))
    assert len(wnids) == 100 and all(w.startswith("n") and len(w) == 9 for w in wnids)
    root = image_folder(tmp_path / "data", wnids + ["n99999999"], per_class=1, size=8)
    argv = ["-c", os.path.join(CONFIGS, "pcl_v2_imagenet100.yaml"), root, *TINY, "-a", "resnet18", "--image-size", "16",
            "--exp-dir", str(tmp_path / "exp")]
    args = validate_pretrain_args(parse_args(build_pretrain_parser(), argv))
    assert os.path.isfile(args.class_list)  # a relative path in a YAML file is relative to that file
    data = build_pretrain_data(data_settings(args))
    assert data.num_samples == 100  # the extra class folder is not read
    os.rename(os.path.join(root, "train", wnids[5]), os.path.join(root, "train", "moved"))
    with pytest.raises(PCLError, match=f"class {wnids[5]} of the class list is not a folder"):
        build_pretrain_data(data_settings(args))
    os.rename(os.path.join(root, "train", "moved"), os.path.join(root, "train", wnids[5]))
    args = validate_pretrain_args(parse_args(build_pretrain_parser(), argv + ["--expect-classes", "10"]))
    with pytest.raises(PCLError, match="100 classes, the preset expects 10"):
        build_pretrain_data(data_settings(args))
    stats = fit(parse_args(build_pretrain_parser(), argv))
    assert stats["epoch"] == 1


def test_small_folder_preset_trains_on_an_image_folder_and_reports_knn(tmp_path):
    root = image_folder(tmp_path / "data", ["a", "b", "c"], per_class=24, size=32)
    argv = ["-c", os.path.join(CONFIGS, "small_folder.yaml"), root, "--width", "4", "--epochs", "2",
            "--warmup-epoch", "1", "--num-cluster", "3,4", "--kmeans-nredo", "1", "--kmeans-niter", "3",
            "--no-progress", "--exp-dir", str(tmp_path / "exp")]
    preset = parse_args(build_pretrain_parser(), ["-c", os.path.join(CONFIGS, "small_folder.yaml"), root])
    assert (preset.epochs, preset.warmup_epoch, preset.lr) == (80, 20, 0.06)  # the measured schedule
    args = validate_pretrain_args(parse_args(build_pretrain_parser(), argv))
    # the preset's own choices reach the run: batch 32 in two BatchNorm splits, large crops, MoCo v2 augmentation
    assert args.dataset == "imagefolder" and args.batch_size == 32 and args.bn_splits == 2
    assert args.crop_min_scale == 0.6 and args.aug_plus and args.pcl_r % args.batch_size == 0
    stats = fit(parse_args(build_pretrain_parser(), argv))
    assert stats["epoch"] == 1 and "loss_proto" in stats
    assert set(stats["knn"]) >= {"learned", "random_init", "raw_pixels"}
