"""Evaluation beyond the original: kNN, clustering metrics, 1%/10% fine-tuning, export."""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import official_checkpoint
from pcl import PCLError
from pcl.export import detectron2_state, export
from pcl.data import read_subset
from pcl.evaluation.cluster_metrics import cluster_accuracy, clustering_scores
from pcl.evaluation.knn import knn_accuracy


def test_knn_separable_is_perfect_and_random_is_near_chance():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 32, generator=gen), dim=1)
    def draw(n):
        y = torch.randint(5, (n,), generator=gen)
        return torch.nn.functional.normalize(centres[y] + 0.05 * torch.randn(n, 32, generator=gen), dim=1), y
    (tr, ytr), (te, yte) = draw(500), draw(200)
    for k in (10, 20, 200):
        assert knn_accuracy(tr, ytr, te, yte, k, 0.07) == 100.0
    rnd = lambda n: torch.nn.functional.normalize(torch.randn(n, 32, generator=gen), dim=1)  # noqa: E731
    acc = knn_accuracy(rnd(2000), torch.randint(5, (2000,), generator=gen), rnd(2000),
                       torch.randint(5, (2000,), generator=gen), 20, 0.07)
    assert 15.0 < acc < 25.0  # chance is 20%


def test_clustering_scores_equal_sklearn_and_hungarian_on_permutation():
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 1000)
    assign = np.where(rng.random(1000) < 0.7, labels, rng.integers(0, 9, 1000))
    scores = clustering_scores(labels, assign)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels, assign) * 100)
    assert scores["ami"] == pytest.approx(adjusted_mutual_info_score(labels, assign) * 100)
    permuted = np.array([3, 0, 6, 1, 5, 2, 4])[labels] + 10  # a relabelling of the classes
    assert cluster_accuracy(labels, permuted) == 100.0
    assert 60.0 < scores["acc"] < 90.0


def test_subset_reader_picks_exactly_the_listed_files(tmp_path):
    train = tmp_path / "train"
    names = {"n001": ["n001_1.JPEG", "n001_2.JPEG", "n001_3.JPEG"], "n002": ["n002_7.JPEG", "n002_8.JPEG"]}
    for wnid, files in names.items():
        os.makedirs(train / wnid)
        for f in files:
            Image.new("RGB", (8, 8)).save(train / wnid / f, format="JPEG")
    folder = torchvision.datasets.ImageFolder(str(train))
    (tmp_path / "1percent.txt").write_text("n002_8.JPEG\nn001_1.JPEG\n\n")
    picked = read_subset(str(train), folder.samples, str(tmp_path / "1percent.txt"))
    assert sorted(os.path.basename(folder.samples[i][0]) for i in picked) == ["n001_1.JPEG", "n002_8.JPEG"]
    assert [folder.samples[i][1] for i in picked] == [1, 0]
    (tmp_path / "bad.txt").write_text("n001_9.JPEG\n")
    with pytest.raises(PCLError, match="n001_9.JPEG"):
        read_subset(str(train), folder.samples, str(tmp_path / "bad.txt"))


def test_export_round_trips_to_torchvision_and_maps_detectron2_keys(tmp_path):
    enc = official_checkpoint(tmp_path / "p.pth.tar", arch="resnet18", mlp=True)
    out = export(str(tmp_path / "p.pth.tar"), str(tmp_path / "r18.pth"))
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    enc.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), enc.eval()(x))
    pkl = export(str(tmp_path / "p.pth.tar"), str(tmp_path / "r18.pkl"), "detectron2")
    with open(pkl, "rb") as f:
        d2 = pickle.load(f)
    keys = set(d2["model"])
    assert {"stem.conv1.weight", "stem.conv1.norm.running_mean", "res2.0.conv1.weight", "res2.0.conv2.norm.bias",
            "res3.0.shortcut.weight", "res3.0.shortcut.norm.weight", "res5.1.conv2.weight"} <= keys
    assert not any(k.startswith(("layer", "fc", "bn1")) for k in keys) and d2["matching_heuristics"]
    assert np.array_equal(d2["model"]["res2.0.conv1.weight"], model.layer1[0].conv1.weight.detach().numpy())
    assert detectron2_state({"layer4.2.downsample.1.bias": torch.zeros(1)})["model"].keys() == {"res5.2.shortcut.norm.bias"}


def test_semisup_fine_tuning_one_epoch_on_the_demo(tmp_path):
    from pcl.evaluation.semisup import build_parser, fit_semisup
    from pcl.config import parse_args

    official_checkpoint(tmp_path / "p.pth.tar")
    args = parse_args(build_parser(), ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "--epochs", "1",
                                       "-b", "32", "--labels-perc", "10", "--pretrained", str(tmp_path / "p.pth.tar"),
                                       "--workers", "0", "--no-progress", "--exp-dir", str(tmp_path / "ss")])
    out = fit_semisup(args)
    assert out["lr"] == 0.01 and out["lr_last_layer"] == 0.2  # SwAV's 10% setting
    assert 0.0 <= out["top1"] <= 100.0 and out["best"]["top1"] >= out["top1"] - 1e-9


def test_export_command_line_writes_what_export_writes(tmp_path):
    """python -m pcl.export CKPT OUT writes the file export() writes."""
    import subprocess
    import sys

    official_checkpoint(tmp_path / "p.pth.tar", arch="resnet18")
    out = tmp_path / "r18.pth"
    proc = subprocess.run([sys.executable, "-m", "pcl.export", str(tmp_path / "p.pth.tar"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-2000:]
    reference = torch.load(export(str(tmp_path / "p.pth.tar"), str(tmp_path / "b.pth")), weights_only=True)
    assert torch.load(out, weights_only=True).keys() == reference.keys()
