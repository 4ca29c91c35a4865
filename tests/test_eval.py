"""eval_linear.py / eval_svm.py: checkpoint loading (ours and the official layout), the linear probe, VOC07 SVMs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import official_checkpoint
from pcl import PCLError
from pcl.checkpoint import load_backbone
from pcl.config import build_linear_parser, build_svm_parser, parse_args
from pcl.data import data_settings, VOC_CLASSES, VOC07
from pcl.evaluation.linear import build_probe, fit_linear, sanity_check
from pcl.evaluation.svm import average_precision, low_shot_indices, run_svm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wrong_arch_checkpoint_fails_clearly_from_the_command_line(tmp_path, capsys):
    official_checkpoint(tmp_path / "r18.pth.tar")
    from pcl.config import build_linear_parser
    from pcl.launch import main

    code = main(build_linear_parser, fit_linear, ["--dataset", "demo", "-a", "resnet50", "--pretrained",
                                                  str(tmp_path / "r18.pth.tar"), "--exp-dir", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "does not fit architecture 'resnet50'" in err


def test_checkpoint_without_backbone_keys_is_refused(tmp_path):
    torch.save({"arch": "resnet18", "state_dict": {"module.queue": torch.zeros(2, 2)}}, tmp_path / "q.pth.tar")
    with pytest.raises(PCLError, match="no backbone weights"):
        load_backbone(str(tmp_path / "q.pth.tar"))


def linear_args(tmp_path, *extra):
    argv = ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "--epochs", "1", "-b", "128",
            "--workers", "0", "--no-progress", "--exp-dir", str(tmp_path / "lin"), *extra]
    return parse_args(build_linear_parser(), argv)


def test_sanity_check_catches_a_changed_frozen_weight(tmp_path):
    official_checkpoint(tmp_path / "p.pth.tar")
    args = linear_args(tmp_path, "--pretrained", str(tmp_path / "p.pth.tar"))
    model, frozen = build_probe(args, 10)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert model.fc.bias.abs().sum() == 0 and 0.005 < model.fc.weight.std() < 0.015
    sanity_check(model, frozen)  # unchanged: passes
    with torch.no_grad():
        model.layer3[0].conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(PCLError, match="layer3.0.conv1.weight"):
        sanity_check(model, frozen)
    model.layer3[0].conv1.weight.data.copy_(frozen["layer3.0.conv1.weight"])
    model.bn1.running_mean += 0.1  # BatchNorm statistics are frozen weights too
    with pytest.raises(PCLError, match="bn1.running_mean"):
        sanity_check(model, frozen)


def test_one_linear_epoch_on_tiny_data(tmp_path):
    official_checkpoint(tmp_path / "p.pth.tar")
    args = linear_args(tmp_path, "--pretrained", str(tmp_path / "p.pth.tar"))
    out = fit_linear(args)
    assert 0.0 <= out["top1"] <= 100.0 and out["top5"] >= out["top1"]
    saved = torch.load(tmp_path / "lin" / "linear_checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 1 and saved["arch"] == "resnet18" and "module.fc.weight" in saved["state_dict"]
    # the saved head evaluates to the same top-1 through --evaluate --resume
    again = fit_linear(linear_args(tmp_path, "--pretrained", str(tmp_path / "p.pth.tar"), "--evaluate", "--resume",
                                   str(tmp_path / "lin" / "linear_checkpoint.pth.tar")))
    assert again["top1"] == pytest.approx(out["top1"])
    log = [json.loads(line) for line in open(tmp_path / "lin" / "linear" / "log.txt")]
    assert log[-1]["epoch"] == 0 and "top1" in log[-1]


def test_cached_linear_mode_runs(tmp_path):
    official_checkpoint(tmp_path / "p.pth.tar")
    out = fit_linear(linear_args(tmp_path, "--pretrained", str(tmp_path / "p.pth.tar"), "--cached-features",
                                 "--cached-views", "2", "--epochs", "3"))
    assert 0.0 <= out["top1"] <= 100.0 and out["extract_seconds"] > 0


# ----------------------------------------------------------------------------------------------------
# SVM
# ----------------------------------------------------------------------------------------------------
def official_ap(targets, preds):
    """The official get_precision_recall + calculate_ap, loops and all (float64 reference)."""
    targets = np.array(targets > 0, dtype=np.float64)
    ind = np.argsort(preds)[::-1]
    tp = targets[ind]
    fp = 1.0 - tp
    P = np.cumsum(tp) / (np.cumsum(tp) + np.cumsum(fp))
    R = np.cumsum(tp) / np.sum(targets)
    mrec = np.concatenate([[0.0], R, [1.0]])
    mpre = np.concatenate([[0.0], P, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in np.where(mrec[1:] != mrec[0:-1])[0] + 1:
        ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def test_average_precision_hand_example_and_official():
    # ranks: +, -, +, -  -> precision 1, 1/2, 2/3, 1/2 at recall .5, .5, 1, 1 -> AP = .5 * 1 + .5 * 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, -1, 1, -1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, -1]) == pytest.approx(0.5 + 0.5 * 2 / 3)  # 0 = negative
    assert average_precision([3.0, 2.0, 1.0], [1, 1, -1]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        targets = rng.choice([-1, 0, 1], size=57, p=[0.6, 0.1, 0.3])
        targets[0] = 1
        scores = np.round(rng.normal(size=57), 1)  # ties included
        assert average_precision(scores, targets) == pytest.approx(official_ap(targets, scores), abs=1e-12)


def test_average_precision_all_negative_is_zero_not_nan():
    assert average_precision([0.3, 0.1, 0.2], [-1, -1, 0]) == 0.0


def test_low_shot_sampling_exact_and_reproducible():
    rng = np.random.default_rng(1)
    labels = rng.choice([-1, 1], size=(200, 5), p=[0.8, 0.2])
    for k in (1, 2, 4, 8):
        picks = low_shot_indices(labels, k, (0, k, 3))
        assert len(picks) == 5
        for c, rows in enumerate(picks):
            assert len(rows) == k and len(set(rows.tolist())) == k and (labels[rows, c] > 0).all()
        again = low_shot_indices(labels, k, (0, k, 3))
        assert all(np.array_equal(a, b) for a, b in zip(picks, again))
    other = low_shot_indices(labels, 8, (1, 8, 3))
    assert not all(np.array_equal(a, b) for a, b in zip(low_shot_indices(labels, 8, (0, 8, 3)), other))
    # a class with fewer positives than k gives all of them
    few = np.full((10, 1), -1)
    few[[2, 5], 0] = 1
    assert sorted(low_shot_indices(few, 4, 0)[0].tolist()) == [2, 5]


def voc_folder(root, n_trainval=30, n_test=16):
    """A tiny VOC2007 layout: random 24x24 JPEGs; every class positive in >= 2 trainval and >= 1 test images."""
    base = os.path.join(root, "VOCdevkit", "VOC2007")
    os.makedirs(os.path.join(base, "JPEGImages"))
    os.makedirs(os.path.join(base, "ImageSets", "Main"))
    rng = np.random.default_rng(0)
    splits = {"trainval": [f"{i:06d}" for i in range(n_trainval)],
              "test": [f"{i:06d}" for i in range(n_trainval, n_trainval + n_test)]}
    for split, names in splits.items():
        labels = -np.ones((len(names), 20), dtype=int)
        for i in range(len(names)):
            labels[i, i % 20] = 1
            labels[i, (i * 7 + 3) % 20] = rng.choice([1, 0])  # a second object, sometimes 'difficult'
        for i, name in enumerate(names):
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            Image.new("RGB", (24, 24), colour).save(os.path.join(base, "JPEGImages", name + ".jpg"))
        for c, cls in enumerate(VOC_CLASSES):
            with open(os.path.join(base, "ImageSets", "Main", f"{cls}_{split}.txt"), "w") as f:
                for name, lab in zip(names, labels[:, c]):
                    f.write(f"{name} {'' if lab < 0 else ' '}{lab}\n")
    return str(root)


def test_voc07_reader_labels(tmp_path):
    root = voc_folder(tmp_path / "voc")
    ds = VOC07(root, "trainval")
    assert len(ds) == 30 and ds.labels.shape == (30, 20)
    assert ds.labels[0, 0] == 1 and ds.labels[1, 0] == -1
    assert set(ds.labels.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_voc_end_to_end_full_and_low_shot(tmp_path):
    root = voc_folder(tmp_path / "voc")
    official_checkpoint(tmp_path / "p.pth.tar", mlp=True)
    args = parse_args(build_svm_parser(), [root, "--pretrained", str(tmp_path / "p.pth.tar"), "--image-size", "32",
                                           "--low-shot", "--shots", "1,2", "--runs", "2", "--cost", "0.5,1.0",
                                           "--n-jobs", "1", "--workers", "0", "--no-progress", "-b", "16",
                                           "--exp-dir", str(tmp_path / "svm")])
    res = run_svm(args)
    assert set(res["shots"]) == {"1", "2"} and 0 <= res["full"]["value"] <= 100
    for k in ("1", "2"):
        assert len(res["shots"][k]["runs"]) == 2 and res["shots"][k]["best_cost"] in (0.5, 1.0)
    saved = json.load(open(tmp_path / "svm" / "svm_voc07.json"))
    assert saved["full"]["value"] == res["full"]["value"]
    table = open(tmp_path / "svm" / "svm_voc07.md").read()
    assert "| k=1 | k=2 | full |" in table and "±" in table


def test_missing_voc_folder_names_the_layout(tmp_path, capsys):
    from pcl.config import build_svm_parser
    from pcl.evaluation.svm import run_svm
    from pcl.launch import main

    code = main(build_svm_parser, run_svm, [str(tmp_path / "none"), "-a", "resnet18", "--exp-dir", str(tmp_path / "e")],
                one_process="eval_svm.py")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "VOCdevkit/VOC2007" in err and "download_voc07.sh" in err


def test_linear_probe_with_two_processes_official_launcher(tmp_path):
    """The official --multiprocessing-distributed form (2 gloo processes on CPU): DDP over the head only."""
    from conftest import free_port

    official_checkpoint(tmp_path / "p.pth.tar")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_linear.py"), "--dataset", "demo", "--demo-renders",
                           "1", "--image-size", "16", "--epochs", "1", "-b", "64", "--workers", "0", "--no-progress",
                           "--pretrained", str(tmp_path / "p.pth.tar"), "--dist-url", f"tcp://127.0.0.1:{free_port()}",
                           "--multiprocessing-distributed", "--world-size", "1", "--rank", "0", "--nproc", "2",
                           "--exp-dir", str(tmp_path / "lin")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sanity check passed" in proc.stderr and "linear probe done" in proc.stderr
    assert os.path.exists(tmp_path / "lin" / "linear_best.pth.tar")


def test_voc_and_places_bad_labels_and_missing_images_are_one_line_errors(tmp_path):
    from pcl import PCLError
    from pcl.data import Places205

    root = voc_folder(tmp_path / "voc")
    main = os.path.join(root, "VOCdevkit", "VOC2007", "ImageSets", "Main")
    os.remove(os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", "000003.jpg"))
    with pytest.raises(PCLError, match=r"VOC2007: the split list names .*000003.jpg, which does not exist"):
        VOC07(root, "trainval")[3]
    with open(os.path.join(main, "dog_trainval.txt"), "a") as f:
        f.write("000001 yes\n")
    with pytest.raises(PCLError, match=r"dog_trainval.txt line 31: label 'yes' is not 1, -1 or 0"):
        VOC07(root, "trainval")
    places = tmp_path / "places"
    (places / "trainvalsplit_places205").mkdir(parents=True)
    images = places / "data" / "vision" / "torralba" / "deeplearning" / "images256"
    images.mkdir(parents=True)
    (places / "trainvalsplit_places205" / "train_places205.csv").write_text("a/x.jpg 3\nb/y.jpg 999\n")
    with pytest.raises(PCLError, match=r"train_places205.csv line 2: label '999' is not a class number 0-204"):
        Places205(str(places), "train")
    (places / "trainvalsplit_places205" / "train_places205.csv").write_text("a/x.jpg 3\n")
    with pytest.raises(PCLError, match=r"Places205: the split list names .*a/x.jpg, which does not exist"):
        Places205(str(places), "train")[0]


def test_unreadable_class_folder_and_file_exp_dir_are_named(tmp_path, monkeypatch, capsys):
    from pcl import PCLError
    from pcl.launch import run_cli
    from pcl.data import image_folder
    from pcl.evaluation import knn

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / "0.png")
    real = os.listdir

    def listdir(path="."):
        if str(path).endswith(os.path.join("train", "b")):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)  # root can read everything: simulate a chmod 000 folder
    with pytest.raises(PCLError, match=r"class folder .*train/b cannot be read \(permission denied\)"):
        image_folder(str(tmp_path), "train")
    monkeypatch.undo()
    exp = tmp_path / "exp_file"
    exp.write_text("x")
    code = run_cli(knn.build_parser, knn.run, ["--dataset", "demo", "--exp-dir", str(exp)])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_validation_classes_that_differ_from_training_are_refused(tmp_path):
    """Labels are class positions: val/ with other class folders would be scored against the wrong labels."""
    from pcl import PCLError
    from pcl.data import file_sets

    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "eel"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    from pcl.config import build_linear_parser, parse_args

    args = parse_args(build_linear_parser(), [str(tmp_path), "--dataset", "imagefolder"])
    with pytest.raises(PCLError, match=r"train/ and val/ hold different classes \(2 vs 2; e.g. \['dog', 'eel'\]\)"):
        file_sets(data_settings(args), labelled=True)


def test_evaluation_loaders_receive_prefetch_and_persistent_workers(tmp_path):
    from pcl.config import build_linear_parser, parse_args
    from pcl.data import build_labelled_data

    for c in ("a", "b"):
        for split in ("train", "val"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    args = parse_args(build_linear_parser(), [str(tmp_path), "-j", "1", "--prefetch-factor", "3",
                                              "--persistent-workers", "--image-size", "8", "-b", "2"])
    data = build_labelled_data(data_settings(args.replace(dataset="imagefolder")))
    for loader in (data.train_loader, data.train_eval_loader, data.val_loader):
        assert loader.loader.prefetch_factor == 3 and loader.loader.persistent_workers
