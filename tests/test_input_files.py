"""Every file the code reads, read by the module that owns it with an explicit encoding and a shape check (issue
41 item 4): YAML configs (pcl.settings), class and subset lists and idx files (pcl.data.datasets). Each case of the
reliability probe s4 that it fixes is named in its test."""

import os

import pytest

from pcl import PCLError
from pcl.config import build_pretrain_parser, parse_args


def _parse_yaml(tmp_path, text, *argv):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text, encoding="utf-8")
    return parse_args(build_pretrain_parser(), ["--dataset", "demo", "-c", str(cfg), *argv])


@pytest.mark.parametrize("text, key", [("lr: 0.06\nepochs: 2\nlr: 0.6\n", "lr"),  # WY01
                                       ("exp_dir: a\nexp_dir: b\n", "exp_dir"),  # WY02
                                       ("epochs: 1\nepochs: 2\n", "epochs")])  # NY02
def test_a_key_given_twice_in_a_config_is_refused(tmp_path, text, key):
    with pytest.raises(PCLError, match=rf"key '{key}' is given twice \(lines \d and \d\); keep one"):
        _parse_yaml(tmp_path, text)


def test_two_spellings_of_one_flag_in_a_config_are_refused(tmp_path):
    with pytest.raises(PCLError, match=r"keys 'exp_dir' and 'exp-dir' are the same flag; keep one"):
        _parse_yaml(tmp_path, "exp_dir: a\nexp-dir: b\n")


@pytest.mark.parametrize("text, key", [("mlp: null\n", "mlp"),  # WY06: was saved as mlp None
                                       ("lr: null\n", "lr"),  # WY03: a TypeError in build_optimizer
                                       ("exp_dir: null\n", "exp_dir"),  # WY04: a TypeError at the lock
                                       ("epochs: ~\n", "epochs")])  # WY07: a TypeError in the validation
def test_null_for_a_flag_with_a_default_is_refused(tmp_path, text, key):
    with pytest.raises(PCLError, match=rf"key '{key}' is null \(empty\): give it a value, or delete the line"):
        _parse_yaml(tmp_path, text)


def test_null_still_unsets_a_flag_that_is_unset_by_default(tmp_path):
    assert _parse_yaml(tmp_path, "seed: null\nbn_splits: ~\n").bn_splits is None


def test_a_config_that_is_a_directory_or_not_utf8_is_named_as_such(tmp_path):
    """NY26: -c DIR said 'config file not found'."""
    (tmp_path / "adir.yaml").mkdir()
    with pytest.raises(PCLError, match=r"config .*adir.yaml is a directory, not a file"):
        parse_args(build_pretrain_parser(), ["-c", str(tmp_path / "adir.yaml")])
    (tmp_path / "l1.yaml").write_bytes("exp_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PCLError, match=r"config .*l1.yaml is not UTF-8 text \(byte 0xe9 at offset 12\)"):
        parse_args(build_pretrain_parser(), ["-c", str(tmp_path / "l1.yaml")])


@pytest.mark.parametrize("content, message", [
    ("a\nb\n".encode("utf-8-sig"), None),  # NL01: the BOM stuck to the first class name
    ("caf\xe9\nb\n".encode("latin-1"), r"--class-list .*latin1.txt is not UTF-8 text \(byte 0xe9"),  # NL07: traceback
    (None, r"--class-list .*adir.txt is a directory, not a file \(one class folder name per line\)"),  # NL08
])
def test_class_lists_are_read_as_utf8_with_their_faults_named(tmp_path, content, message):
    from pcl.data import read_class_list

    name = {None: "adir.txt"}.get(content, "latin1.txt" if message else "bom.txt")
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    if message is None:
        assert read_class_list(str(path)) == ["a", "b"]
    else:
        with pytest.raises(PCLError, match=message):
            read_class_list(str(path))


def test_a_subset_list_in_another_encoding_is_one_line(tmp_path):
    from pcl.data import read_subset

    (tmp_path / "sub.txt").write_bytes("n01_\xe9.JPEG\n".encode("latin-1"))
    with pytest.raises(PCLError, match=r"subset .*sub.txt is not UTF-8 text"):
        read_subset(str(tmp_path), [], str(tmp_path / "sub.txt"))


def test_an_idx_file_of_zero_images_is_one_line(tmp_path):
    """NI08: a ValueError from torch.frombuffer."""
    import torch

    from pcl.data import read_idx, write_idx

    write_idx(str(tmp_path / "empty-idx3-ubyte"), torch.zeros(0, 28, 28, dtype=torch.uint8))
    with pytest.raises(PCLError, match=r"empty-idx3-ubyte is empty \(its header says 0 x 28 x 28\)"):
        read_idx(str(tmp_path / "empty-idx3-ubyte"))


@pytest.mark.parametrize("name, error", [
    ("fashion-mnist", RuntimeError("Error downloading train-images-idx3-ubyte.gz")),  # NH07
    ("cifar10", OSError(101, "Network is unreachable")),  # NH06: urllib's URLError is an OSError
])
def test_download_without_a_network_is_one_line(tmp_path, monkeypatch, name, error):
    import torchvision.datasets as tvd

    from pcl.data import data_settings, load_in_memory
    from pcl.data.datasets import file_sets
    from pcl.config import validate_pretrain_args

    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr(tvd, "FashionMNIST" if name == "fashion-mnist" else "CIFAR10", offline)
    cfg = data_settings(validate_pretrain_args(parse_args(build_pretrain_parser(),
                                                          [str(tmp_path), "--dataset", name, "--download"])))
    with pytest.raises(PCLError, match=rf"--download {name} into .* failed \(.*\): without a network, fetch the "
                                       rf"files elsewhere"):
        load_in_memory(cfg) if name == "fashion-mnist" else file_sets(cfg, labelled=False)


def test_the_old_export_command_line_says_where_export_went(tmp_path):
    """WX06: `python -m pcl.checkpoint export IN OUT` exited 0 and wrote nothing."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "pcl.checkpoint", "export", "in.pth.tar", str(tmp_path / "o.pth")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2 and out.stderr.startswith("error: pcl.checkpoint has no command line; export a "
                                                         "backbone with: python -m pcl.export in.pth.tar "), out.stderr


def test_a_float_image_in_0_1_is_read_with_1_as_white(tmp_path):
    """NM03: a float TIFF of 0.8 became pixel value 1 (black) instead of 204."""
    import numpy as np
    from PIL import Image

    from pcl.data import load_image

    Image.fromarray(np.full((4, 4), 0.8, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32), mode="F").save(tmp_path / "g.tif")
    assert np.asarray(load_image(str(tmp_path / "f.tif"))).mean() == 204
    assert np.asarray(load_image(str(tmp_path / "g.tif"))).mean() == 200  # a float image in 0-255 stays as it was


@pytest.mark.parametrize("policy", ["fail", "skip"], ids=["NM04", "NM05"])
def test_a_fifo_named_like_an_image_is_an_unreadable_image_not_a_hang(tmp_path, policy):
    """NM04/NM05: open() of a FIFO named *.png blocked for ever (SIGKILL after 65 s)."""
    import threading

    from conftest import image_folder
    from pcl.data import image_folder as scan

    root = image_folder(tmp_path / "d", ["a"], per_class=1, splits=("train",))
    os.mkfifo(os.path.join(root, "train", "a", "1.png"))
    images = scan(root, "train", policy)
    result = []
    worker = threading.Thread(target=lambda: result.append(_outcome(images, 1)), daemon=True)
    worker.start()
    worker.join(10)
    assert result, "reading the FIFO blocked"
    if policy == "skip":
        assert result[0] == "ok" and images.skipped == 1
    else:
        assert "not a regular file (a FIFO" in result[0]


def _outcome(images, index):
    try:
        images[index]
        return "ok"
    except PCLError as e:
        return str(e)


@pytest.mark.parametrize("config, message", [
    ("resnet18", r"its 'model_config' is a str, not a mapping of width, stem"),  # X11: AttributeError
    ({"width": "64"}, r"its model_config 'width' is '64', not an integer"),
])
def test_a_checkpoints_model_config_of_the_wrong_shape_is_one_line(tmp_path, config, message):
    import torch

    from conftest import official_checkpoint
    from pcl.export import export

    official_checkpoint(tmp_path / "p.pth.tar")
    ckpt = torch.load(tmp_path / "p.pth.tar", weights_only=True)
    ckpt["model_config"] = config
    torch.save(ckpt, tmp_path / "bad.pth.tar")
    with pytest.raises(PCLError, match=message):
        export(str(tmp_path / "bad.pth.tar"), str(tmp_path / "out.pth"))


@pytest.mark.parametrize("result, message", [
    ({"im2cluster": [], "centroids": [], "density": []}, r"holds 0 / 0 / 0 granularities"),
    ("k=2", r"is not a mapping of im2cluster, centroids and density lists"),
])
def test_a_damaged_cluster_result_is_one_line(result, message):
    """Checkpoints of each kind are shape-checked where they are read (issue 41 item 4): the E-step's prototypes."""
    import torch

    from pcl.checkpoint import check_cluster_result

    with pytest.raises(PCLError, match=message):
        check_cluster_result(result, "c.pth.tar")
    good = {"im2cluster": [torch.zeros(6, dtype=torch.long)], "centroids": [torch.eye(2, 4)], "density": [torch.ones(2)]}
    check_cluster_result(good, "c.pth.tar")
    with pytest.raises(PCLError, match=r"granularity 0 has the wrong shapes"):
        check_cluster_result({**good, "density": [torch.ones(3)]}, "c.pth.tar")
