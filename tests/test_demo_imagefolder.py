"""experiments/demo_imagefolder.py's guards (reliability probe s4: WI01-WI05): its default JSON stays out of the
checkout's committed results, the folder it draws is reused only when drawn with the same flags, a run folder that
holds a run is refused before anything is drawn, and every refusal is one line."""

import argparse
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_clean_error
from test_experiments import TINY_PRETRAIN, driver

TINY = ["--", "--epochs", "1", "--warmup-epoch", "0", *TINY_PRETRAIN, "-b", "16", "--pcl-r", "32", "--num-cluster",
        "3,4", "--bn-splits", "2"]


def digits_opts(train: int, val: int) -> argparse.Namespace:
    return argparse.Namespace(source="digits", train_images=train, val_images=val, no_clutter=False, anywhere=False)


def test_too_few_digits_for_every_class_is_one_line_before_drawing(tmp_path):
    """WI04: --train-images 5 cannot hold the 10 classes: said as such (with the count that can), nothing drawn."""
    from pcl import PCLError

    demo = driver("demo_imagefolder")
    with pytest.raises(PCLError, match=r"--val-images 5: the first 5 digits drawn for val/ hold no .* every class "
                                       r"needs an image: give --val-images \d+ or more"):
        demo.main(["--source", "digits", "--train-images", "5", "--val-images", "5", "--out-dir",
                   str(tmp_path / "o"), "--json", str(tmp_path / "j.json")])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_drawn_folder_is_reused_only_when_drawn_the_same_way(tmp_path):
    """The folder carries made_with.json: the same flags reuse it untouched; other flags, or a half-written folder
    without the record (WI05: train/ with one class, no val/), are refused instead of trained on."""
    from pcl import PCLError

    demo = driver("demo_imagefolder")
    data = str(tmp_path / "data")
    demo.build_folder(digits_opts(40, 20), data)
    stamp = os.path.getmtime(os.path.join(data, "made_with.json"))
    demo.build_folder(digits_opts(40, 20), data)
    assert os.path.getmtime(os.path.join(data, "made_with.json")) == stamp
    with pytest.raises(PCLError, match="made with other settings or data .*train_images: 40 there, 60 now"):
        demo.build_folder(digits_opts(60, 20), data)
    half = tmp_path / "half" / "data" / "train" / "class_0"
    half.mkdir(parents=True)
    (half / "00000.png").write_bytes(b"")
    with pytest.raises(PCLError, match="holds an image folder but no made_with.json"):
        demo.main(["--source", "digits", "--train-images", "40", "--val-images", "20", "--out-dir",
                   str(tmp_path / "half"), "--json", str(tmp_path / "j.json"), *TINY])
    assert not (tmp_path / "half" / "run").exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_default_json_and_a_used_run_folder(tmp_path, monkeypatch):
    """WI02: without --json the result goes to exp/results/ (relative to the working directory), not over the
    checkout's experiments/results/demo_imagefolder_digits.json. WI03: the same --out-dir again is refused before
    the folder is touched, in one line; -- --resume auto continues instead."""
    from pcl import PCLError

    committed = os.path.join(ROOT, "experiments", "results", "demo_imagefolder_digits.json")
    before = open(committed).read()
    monkeypatch.chdir(tmp_path)
    demo = driver("demo_imagefolder")
    argv = ["--source", "digits", "--train-images", "40", "--val-images", "20", "--out-dir", "o", *TINY]
    res = demo.main(argv)
    assert (tmp_path / "exp" / "results" / "demo_imagefolder_digits.json").exists() and res["epochs"] == 1
    assert open(committed).read() == before
    stamp = os.path.getmtime(tmp_path / "o" / "data" / "made_with.json")
    with pytest.raises(PCLError, match="o/run holds a run already: give another --out-dir"):
        demo.main(argv)
    assert os.path.getmtime(tmp_path / "o" / "data" / "made_with.json") == stamp


def test_missing_fashion_files_are_one_line(tmp_path):
    """WI01, as a user runs the script: exit 2, one 'error:' line naming the missing files, no traceback."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "demo_imagefolder.py"), "--source",
                           "fashion", "--idx-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o"),
                           "--json", str(tmp_path / "j.json")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert_clean_error(proc.returncode, proc.stderr, "fashion-mnist not found")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
