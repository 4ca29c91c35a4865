"""The MNIST-family reader (idx files, gz or plain, two layouts) and a pretraining run on tiny idx data."""

import gzip
import os
import sys

import pytest
import torch

from conftest import ROOT, fake_mnist, tiny_args
from pcl import PCLError
from pcl.checkpoint import load_checkpoint
from pcl.config import build_pretrain_parser, parse_args, validate_pretrain_args
from pcl.data import data_settings, load_in_memory, load_mnist_family, read_idx, write_idx
from pcl.engine import fit


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    data = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    write_idx(str(tmp_path / name), data)
    assert torch.equal(read_idx(str(tmp_path / name)), data)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    write_idx(str(tmp_path / ("l" + name)), labels)
    assert torch.equal(read_idx(str(tmp_path / ("l" + name))), labels)


@pytest.mark.parametrize("gz,layout", [(True, "flat"), (False, "flat"), (True, "torchvision"), (False, "torchvision")])
def test_both_layouts_and_compressions_load_the_official_split(tmp_path, gz, layout):
    fake_mnist(tmp_path, n_train=30, n_test=20, gz=gz, layout=layout)
    sets = load_mnist_family("fashion-mnist", str(tmp_path))
    assert sets["train"].shape == (30, 1, 28, 28) and sets["test"].shape == (20, 1, 28, 28)
    assert sets["train"].dtype == torch.uint8 and sets["train_labels"].dtype == torch.long
    assert sets["train_labels"].tolist() == [i % 10 for i in range(30)]


def test_in_memory_set_is_three_channel_uint8_at_the_image_size(tmp_path):
    fake_mnist(tmp_path, n_train=20, n_test=10)
    args = parse_args(build_pretrain_parser(), [str(tmp_path), "--dataset", "fashion-mnist", "--image-size", "28"])
    sets = load_in_memory(data_settings(args))
    x = sets["train"]
    assert x.shape == (20, 3, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 2])  # grey: the same values in every channel
    assert load_in_memory(data_settings(args.replace(image_size=32)))["test"].shape == (10, 3, 32, 32)


def _corrupt(path, payload):
    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("payload,message", [
    (b"\x00\x00\x0c\x03" + b"\x00" * 40, "not an idx file of unsigned bytes"),  # float type code
    (b"<html>not found</html>", "not an idx file"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated inside its header"),
    (b"\x00\x00\x08\x03" + (30).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100, "truncated or corrupt"),
])
def test_corrupt_files_are_one_line_errors_naming_the_file(tmp_path, payload, message):
    fake_mnist(tmp_path, n_train=30, n_test=20)
    bad = os.path.join(tmp_path, "train-images-idx3-ubyte.gz")
    _corrupt(bad, payload)
    with pytest.raises(PCLError, match=message) as e:
        load_mnist_family("fashion-mnist", str(tmp_path))
    assert bad in str(e.value) and "\n" not in str(e.value)


def test_not_gzip_and_mismatched_counts_are_clear_errors(tmp_path):
    fake_mnist(tmp_path, n_train=30, n_test=20)
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"plain bytes, not gzip")
    with pytest.raises(PCLError, match="cannot read idx file"):
        load_mnist_family("fashion-mnist", str(tmp_path))
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), torch.zeros(7, dtype=torch.uint8))
    with pytest.raises(PCLError, match="expected N x H x W images and N labels"):
        load_mnist_family("fashion-mnist", str(tmp_path))


def test_missing_files_name_both_ways_to_get_them(tmp_path):
    with pytest.raises(PCLError) as e:
        load_mnist_family("fashion-mnist", str(tmp_path))
    text = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in text and "--download" in text and "FashionMNIST/raw" in text
    with pytest.raises(PCLError, match="--download"):
        load_mnist_family("kmnist", str(tmp_path))


def test_one_epoch_run_and_learning_curve_on_tiny_idx_data(tmp_path):
    data = tmp_path / "fm"
    fake_mnist(data, n_train=128, n_test=40, gz=False, layout="torchvision")
    args = tiny_args(tmp_path / "run", str(data), "--dataset", "fashion-mnist", "--image-size", "28",
                     "--knn-every", "1", "--fixed-concentration")
    stats = fit(args)
    assert stats["epoch"] == 1 and "loss_proto" in stats
    assert 0.0 <= stats["knn_top1"] <= 100.0 and 0.0 <= stats["test_nmi"] <= 100.0  # the monitor's two curves
    ckpt = load_checkpoint(os.path.join(tmp_path / "run", "checkpoint_last.pth.tar"))
    for phi in ckpt["cluster_result"]["density"]:  # --fixed-concentration: phi = --temperature everywhere
        assert torch.allclose(phi, torch.full_like(phi, 0.2))


def test_mnist_family_needs_its_folder():
    args = parse_args(build_pretrain_parser(), ["--dataset", "mnist"])
    with pytest.raises(PCLError, match="needs the folder of its idx files"):
        validate_pretrain_args(args)  # before any data or model is touched
    with pytest.raises(PCLError, match="needs the folder of its idx files"):
        load_in_memory(data_settings(args))


def test_small_scale_benchmark_runs_at_toy_size(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import small_scale

    data = fake_mnist(tmp_path / "fm", n_train=200, n_test=60)
    out = tmp_path / "bench.json"
    results = small_scale.main([
        "--data", data, "--epochs", "2", "--rows", "pcl,moco,raw,random", "--linear-epochs", "2", "--svm-runs", "1",
        "--shots", "1,2", "--out", str(out), "--exp-root", str(tmp_path / "exp"), "--",
        "--width", "4", "--batch-size", "32", "--pcl-r", "64", "--num-cluster", "10,20", "--knn-every", "1",
        "--kmeans-nredo", "1", "--expect-images", "0"])
    names = [r["key"] for r in results]
    assert names == ["pcl", "moco", "raw", "random"]
    for r in results:
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["nmi"] <= 1 and set(r["svm_map"]) == {"1", "2"}
    pcl, moco = results[0], results[1]
    assert len(pcl["curve"]) == 2 and pcl["train_seconds"] > 0
    assert pcl["final_loss"] != moco["final_loss"]  # ProtoNCE really is off in the MoCo row
    assert out.exists() and "published" in out.read_text()
