"""Bad input: one clear line naming the problem, non-zero exit, no traceback."""

import contextlib
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-a", "resnet18", "--width", "4", "--stem", "small", "--image-size", "16", "-b", "4", "--pcl-r", "8",
        "--workers", "0", "--epochs", "1", "--warmup-epoch", "0", "--num-cluster", "2,3", "--no-progress",
        "--bn-splits", "2"]


def run(*argv):
    """main_pcl.py's main in this process (the script is one line around it; --help below runs the script)."""
    from pcl.config import build_pretrain_parser
    from pcl.engine import fit
    from pcl.launch import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(build_pretrain_parser, fit, list(argv))
    return code, err.getvalue()


def image_folder(root, n=12):
    for i in range(n):
        d = os.path.join(root, "train", f"class{i % 2}")
        os.makedirs(d, exist_ok=True)
        Image.new("RGB", (20, 20), (i * 20, 0, 255 - i * 20)).save(os.path.join(d, f"{i}.png"))
    return str(root)


def assert_clean_error(code, err, *phrases):
    assert code != 0
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for phrase in phrases:
        assert phrase in lines[0], err


def test_missing_data_dir(tmp_path):
    code, err = run(str(tmp_path / "nope"), *TINY, "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "data folder not found", "nope")


def test_empty_data_dir(tmp_path):
    os.makedirs(tmp_path / "d" / "train")
    code, err = run(str(tmp_path / "d"), *TINY, "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "no images in", "train")


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"this is not a checkpoint")
    code, err = run(image_folder(tmp_path / "d"), *TINY, "--resume", str(bad), "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "bad.pth.tar", "unreadable")


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\nnum_clusters: 10\n")
    code, err = run("-c", str(cfg), "--dataset", "demo")
    assert_clean_error(code, err, "unknown key 'num_clusters'")


def test_malformed_num_cluster(tmp_path):
    code, err = run(str(tmp_path), "--num-cluster", "100,abc")
    assert_clean_error(code, err, "--num-cluster", "malformed")


def test_more_clusters_than_samples(tmp_path):
    argv = [a if a != "2,3" else "5,100" for a in TINY]
    code, err = run(image_folder(tmp_path / "d"), *argv, "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "k=100", "12 training samples")


def test_no_data_at_all():
    code, err = run("--epochs", "1")
    assert_clean_error(code, err, "--dataset demo")


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_official_flags(flag):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "main_pcl.py"), flag], capture_output=True,
                         text=True, timeout=120).stdout
    for name in ("--arch", "--pcl-r", "--moco-m", "--num-cluster", "--warmup-epoch", "--exp-dir", "--aug-plus"):
        assert name in out
