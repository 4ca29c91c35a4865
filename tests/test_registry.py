"""The dataset table (pcl.data.registry): it and the parsers agree, adding a dataset is one entry, and its facts
match what the readers find on tiny fake data."""


import pytest
import torch

from conftest import fake_cifar, fake_mnist, fake_stl10, image_folder, tiny_args
from pcl import PCLError
from pcl.config import build_linear_parser, build_pretrain_parser, build_svm_parser, parse_args, validate_pretrain_args
from pcl.data import data_settings, build_labelled_data, build_pretrain_data, file_sets, load_in_memory, registry
from pcl.data.registry import DATASETS, DatasetSpec, spec
from pcl.data.transfer import svm_sets


def dataset_choices(parser):
    return next(a.choices for a in parser._actions if a.dest == "dataset")


@pytest.fixture
def no_md5(monkeypatch):
    """The fake torchvision files are not the real ones: skip torchvision's checksum."""
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)


def test_every_dataset_choice_has_a_table_entry_and_every_entry_is_offered():
    shared = dataset_choices(build_pretrain_parser())
    assert shared[0] == registry.AUTO and registry.AUTO not in DATASETS
    assert shared[1:] == [n for n, s in DATASETS.items() if "data" in s.parsers]
    assert dataset_choices(build_linear_parser()) == shared  # every evaluation shares the data flags
    svm = dataset_choices(build_svm_parser())
    assert svm == [n for n, s in DATASETS.items() if "svm" in s.parsers]
    assert set(shared[1:]) | set(svm) == set(DATASETS)
    # the lists as they were before the table (their order is argparse's "choose from" message)
    assert shared == ["auto", "imagefolder", "cifar10", "cifar100", "stl10", "mnist", "fashion-mnist", "kmnist", "demo"]
    assert svm == ["voc07", "places205", "mnist", "fashion-mnist", "kmnist", "demo"]


def test_every_entry_is_consistent_and_its_reader_loads():
    for name, entry in DATASETS.items():
        assert entry.name == name
        assert callable(entry.load_reader()), name
        assert not entry.download or entry.torchvision, f"{name}: --download needs a torchvision class"
        assert not entry.needs_dir or entry.takes_dir, name
        if entry.in_memory:
            assert entry.num_classes, f"{name}: the SVM path needs a class count or labels"


def test_unknown_names_and_wrong_uses_name_the_valid_ones():
    with pytest.raises(PCLError, match="--dataset svhn: unknown dataset; choose one of voc07, places205, imagefolder"):
        spec("svhn")
    with pytest.raises(PCLError, match="--dataset voc07 cannot be used here; choose one of imagefolder, cifar10"):
        spec("voc07", "data")
    with pytest.raises(PCLError, match="storage 'disk' is not one of the known values"):
        DatasetSpec("x", "X", "disk", "DIR", "m:f")
    with pytest.raises(PCLError, match="reader 'pcl.data.datasets:nothing' cannot be loaded"):
        DatasetSpec("x", "X", "files", "DIR", "pcl.data.datasets:nothing").load_reader()


def _toy_reader(calls):
    """An in-memory reader of 3 classes of grey 8 x 8 images (the MNIST family's shape, smaller)."""
    def read(entry, args):
        calls.append((entry.name, args.dataset))
        gen = torch.Generator().manual_seed(0)
        labels = torch.arange(48) % 3
        return {"train": torch.randint(0, 255, (48, 1, 8, 8), dtype=torch.uint8, generator=gen),
                "train_labels": labels, "test": torch.randint(0, 255, (12, 1, 8, 8), dtype=torch.uint8, generator=gen),
                "test_labels": labels[:12]}
    return read


def test_adding_an_in_memory_dataset_is_one_table_entry(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(DATASETS, "toy", DatasetSpec("toy", "Toy", "memory", "nothing", _toy_reader(calls),
                                                     parsers=("data", "svm")))
    args = validate_pretrain_args(tiny_args(tmp_path / "exp", "--dataset", "toy", "-b", "16"))  # offered
    assert args.dataset == "toy"
    data = build_pretrain_data(data_settings(args))
    assert calls == [("toy", "toy")] and data.num_samples == 48 and data.knn is not None
    images, _, _ = next(iter(data.train_loader))
    assert images.shape[1:] == (3, 16, 16)  # grey, 8 px -> the standard 3 channels at --image-size
    assert build_labelled_data(data_settings(args)).num_classes == 3
    svm_args = parse_args(build_svm_parser(), ["--dataset", "toy", "--image-size", "16"])
    _, train_y, _, test_y, single = svm_sets(data_settings(svm_args))
    assert train_y.shape == (48, 3) and test_y.shape == (12, 3) and single  # the labels' 3 classes, not 10


def test_adding_a_file_dataset_is_one_table_entry(tmp_path, monkeypatch, pcl_warnings):
    root = image_folder(tmp_path / "data", ["a", "b"], per_class=3, splits=("train",))
    monkeypatch.setitem(DATASETS, "folders", DatasetSpec("folders", "Folders", "files", "a folder tree",
                                                         "pcl.data.datasets:imagefolder_sets", pretrain_labelled=False,
                                                         test_split="val", needs_dir=True))
    with pytest.raises(PCLError, match="--dataset folders needs a folder tree as DIR$"):
        validate_pretrain_args(tiny_args(tmp_path / "exp", "--dataset", "folders"))
    args = validate_pretrain_args(tiny_args(tmp_path / "exp", root, "--dataset", "folders", "--knn-every", "1"))
    data = build_pretrain_data(data_settings(args), knn_wanted=args.knn_every > 0)
    assert data.num_samples == 6 and data.knn is None
    assert any("Folders's pretraining split is unlabeled" in line for line in pcl_warnings), pcl_warnings


def test_stl10_pretrains_on_its_unlabeled_split_without_the_knn_monitor(tmp_path, no_md5, pcl_warnings):
    entry = spec("stl10")
    assert entry.pretrain_split == "unlabeled" and not entry.pretrain_labelled
    fake_stl10(tmp_path / "data", n_unlabeled=12, n_train=10, n_test=10, size=96)
    args = validate_pretrain_args(tiny_args(tmp_path / "exp", str(tmp_path / "data"), "--dataset", "stl10",
                                            "--knn-every", "1"))
    train, test = file_sets(data_settings(args), labelled=False)
    assert len(train) == 12 and set(train.labels.tolist()) == {-1}  # torchvision's "no label"
    train, test = file_sets(data_settings(args), labelled=True)
    assert len(train) == 10 and int(train.labels.max()) < entry.num_classes and len(test) == 10
    data = build_pretrain_data(data_settings(args), knn_wanted=args.knn_every > 0)
    assert data.num_samples == 12 and data.knn is None
    assert any("STL-10's pretraining split is unlabeled" in line for line in pcl_warnings), pcl_warnings


@pytest.mark.parametrize("name,n_train", [("cifar10", 50), ("cifar100", 200)])  # cifar10: 5 batches of 10
def test_cifar_class_counts_match_the_files(tmp_path, no_md5, name, n_train):
    fake_cifar(tmp_path / "data", name, n_train=n_train, n_test=20)
    args = validate_pretrain_args(tiny_args(tmp_path / "exp", str(tmp_path / "data"), "--dataset", name))
    train, test = file_sets(data_settings(args), labelled=True)
    assert len(train) == n_train and len(set(train.targets)) == spec(name).num_classes == len(train.classes)
    assert spec(name).pretrain_labelled and build_pretrain_data(data_settings(args)).knn is not None


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_the_mnist_family_holds_the_table_s_class_count(tmp_path, name):
    entry = spec(name)
    fake_mnist(tmp_path / "data", n_train=30, n_test=20, name=entry.torchvision, layout="torchvision")
    args = validate_pretrain_args(tiny_args(tmp_path / "exp", str(tmp_path / "data"), "--dataset", name))
    sets = load_in_memory(data_settings(args))
    assert entry.in_memory and sets["train_labels"].unique().numel() == entry.num_classes
    _, train_y, _, _, _ = svm_sets(data_settings(parse_args(build_svm_parser(), [str(tmp_path / "data"), "--dataset", name,
                                                                 "--image-size", "16"])))
    assert train_y.shape == (30, entry.num_classes)


def test_the_demo_set_holds_the_table_s_class_count_and_a_dir_overrides_it(tmp_path):
    entry = spec("demo")
    args = validate_pretrain_args(tiny_args(tmp_path / "exp"))
    sets = load_in_memory(data_settings(args))
    assert entry.in_memory and sets["train_labels"].unique().numel() == entry.num_classes
    root = image_folder(tmp_path / "data", ["a", "b"], per_class=1)
    assert validate_pretrain_args(tiny_args(tmp_path / "exp", root)).dataset == registry.DIR_DATASET


def test_imagefolder_takes_its_classes_from_the_folders(tmp_path):
    assert spec("imagefolder").num_classes is None and spec("imagefolder").class_list
    root = image_folder(tmp_path / "data", ["a", "b", "c"], per_class=2)
    args = validate_pretrain_args(tiny_args(tmp_path / "exp", root, "--dataset", "auto"))
    train, test = file_sets(data_settings(args), labelled=False)
    assert args.dataset == "imagefolder" and len(train.classes) == 3 and test is not None
