"""Pretraining on images without classes: a flat folder (odd files included), DIR/train/ flat, nested folders with
--unlabelled; the kNN/NMI report is skipped with one line."""

import os

import pytest
from PIL import Image

from conftest import TINY, assert_clean_error, run_main


def odd_folder(folder, n=10):
    """n RGB PNGs plus a grayscale PNG, a CMYK JPEG, an RGBA PNG, a 16-bit PNG, a zero-byte file and a text file."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 20), (i * 25, 255 - i * 25, 90)).save(os.path.join(folder, f"img{i:02d}.png"))
    Image.new("L", (24, 18), 120).save(os.path.join(folder, "grey.png"))
    Image.new("CMYK", (20, 20), (10, 200, 30, 0)).save(os.path.join(folder, "cmyk.jpg"))
    Image.new("RGBA", (20, 20), (9, 9, 9, 128)).save(os.path.join(folder, "alpha.PNG"))
    Image.new("I;16", (20, 20), 40000).save(os.path.join(folder, "deep.png"))
    open(os.path.join(folder, "empty.png"), "wb").close()
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image\n")
    return str(folder)


def pretrain_set(*argv):
    from pcl.config import build_pretrain_parser, parse_args, validate_pretrain_args
    from pcl.data import data_settings, file_sets

    cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), [*argv, *TINY]))
    return file_sets(data_settings(cfg), labelled=False)


def test_a_flat_folder_of_odd_files_pretrains_and_skips_the_knn_report_in_one_line(tmp_path):
    folder = odd_folder(tmp_path / "flat")
    exp = tmp_path / "exp"
    code, err = run_main(folder, *TINY, "--bad-images", "skip", "--knn-eval", "--exp-dir", str(exp))
    assert code == 0, err
    log = (exp / "train.log").read_text()
    assert "15 samples" in log  # 14 images and the empty file (replaced by the next image when read)
    assert log.count("no kNN/NMI report: the images in") == 1 and "kNN top-1" not in log
    assert "unreadable image" in log and "empty.png" in log
    assert "--knn-eval / --knn-every have no effect" not in log
    next_line = next(ln for ln in log.splitlines() if "Next: " in ln)
    assert "pcl.evaluation.visualize " + folder in next_line and "eval_linear" not in next_line


def test_a_zero_byte_file_stops_a_flat_folder_run_by_default_naming_it(tmp_path):
    folder = odd_folder(tmp_path / "flat")
    code, err = run_main(folder, *TINY, "--exp-dir", str(tmp_path / "exp"))
    assert_clean_error(code, err, "empty.png", "--bad-images skip")


def test_images_directly_in_train_are_a_flat_folder_too(tmp_path):
    odd_folder(tmp_path / "root" / "train", n=4)
    train, test = pretrain_set(str(tmp_path / "root"))
    assert len(train) == 9 and test is None and not train.labelled


def test_nested_folders_are_classes_unless_unlabelled(tmp_path):
    for rel in ("train/cats/a", "train/cats", "train/dogs/x/y"):
        odd_folder(tmp_path / "root" / rel, n=2)
    labelled, _ = pretrain_set(str(tmp_path / "root"))
    assert labelled.labelled and labelled.classes == ["cats", "dogs"]
    unlabelled, test = pretrain_set(str(tmp_path / "root"), "--unlabelled")
    assert len(unlabelled) == len(labelled) == 21 and not unlabelled.labelled and test is None
    assert set(unlabelled.targets) == {0} and unlabelled.classes == []


def test_unlabelled_evaluations_are_refused_where_they_score_labels(tmp_path):
    from pcl import PCLError
    from pcl.config import build_pretrain_parser, parse_args
    from pcl.data import data_settings, file_sets

    odd_folder(tmp_path / "root" / "train" / "a", n=2)
    cfg = parse_args(build_pretrain_parser(), [str(tmp_path / "root"), "--unlabelled", "--dataset", "imagefolder"])
    with pytest.raises(PCLError, match="--unlabelled: this evaluation scores class labels"):
        file_sets(data_settings(cfg), labelled=True)
