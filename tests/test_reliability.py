"""No lost work: preemption + --resume auto, atomic saves under kill -9 and full disks, bad inputs."""

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY, assert_clean_error, copy_run, run_main, tiny_args, two_class_folder
from pcl import PCLError, Preempted
from pcl import checkpoint as ckpt_io
from pcl.engine import fit
from pcl.preemption import StopRequest


def _state(path):
    return ckpt_io.load_checkpoint(str(path))["state_dict"]


def test_sigterm_mid_epoch_then_resume_auto_equals_uninterrupted(tmp_path, tiny_run):
    full, cut = tiny_run, tmp_path / "cut"  # full: fit(tiny_args(full)), uninterrupted

    def preempt(epoch, step):  # SLURM's SIGTERM arrives during epoch 1 (after its E-step), step 3
        if (epoch, step) == (1, 3):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted) as stopped:
        fit(tiny_args(cut), on_step=preempt)
    assert stopped.value.epoch == 1 and stopped.value.step == 4 and "--resume auto" in str(stopped.value)
    saved = ckpt_io.load_checkpoint(stopped.value.path)
    assert saved["epoch"] == 1 and saved["step"] == 4 and "cluster_result" in saved and len(saved["resume_states"]) == 1
    # NG04: after the stop a second SIGTERM is logged, not the default kill (exit 143 where 75 was due)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    os.kill(os.getpid(), signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fit(tiny_args(cut, "--resume", "auto"))
    a, b = _state(full / "checkpoint_0001.pth.tar"), _state(cut / "checkpoint_0001.pth.tar")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stop_request_catches_sigusr1():
    stop = StopRequest().install()
    try:
        assert not stop.requested(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested(torch.device("cpu")) and stop.signal_name == "SIGUSR1"
    finally:
        stop.restore()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)


def test_a_second_sigterm_after_the_stop_does_not_kill_the_saved_run():
    """NG04: two TERMs 0.1 s apart: the checkpoint was saved and 'preempted:' printed, then exit 143, not 75."""
    sigint = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started in the background
    quiet = StopRequest().install()
    quiet.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # no stop: the handlers are given back as they were
    stop = StopRequest().install()
    os.kill(os.getpid(), signal.SIGTERM)
    stop.restore()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the default action would end this test process here
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)


def test_resume_auto_skips_a_truncated_newest_checkpoint(tmp_path, caplog):
    ckpt_io.save_checkpoint({"epoch": 3, "state_dict": {"w": torch.ones(3)}}, ckpt_io.checkpoint_path(str(tmp_path), 2))
    good = (tmp_path / "checkpoint_0002.pth.tar").read_bytes()
    (tmp_path / "checkpoint_0005.pth.tar").write_bytes(good[: len(good) // 2])  # newest, cut short
    os.remove(tmp_path / "checkpoint_last.pth.tar")
    logging.getLogger("pcl").addHandler(caplog.handler)  # the pcl logger does not propagate to the root
    try:
        path, ckpt = ckpt_io.resolve_resume("auto", str(tmp_path))
    finally:
        logging.getLogger("pcl").removeHandler(caplog.handler)
    assert path.endswith("checkpoint_0002.pth.tar") and ckpt["epoch"] == 3
    assert "skipping" in caplog.text and "checkpoint_0005" in caplog.text
    assert ckpt_io.resolve_resume("auto", str(tmp_path / "empty")) == (None, None)


def test_kill_9_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from pcl.checkpoint import save_checkpoint
        path = {str(tmp_path / "ckpt.pth.tar")!r}
        save_checkpoint({{"epoch": 1, "w": torch.zeros(10)}}, path)
        print("first", flush=True)
        i = 2
        while True:  # big writes, so that the kill lands inside one
            save_checkpoint({{"epoch": i, "w": torch.randn(8_000_000)}}, path)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    import time

    time.sleep(1.5)
    proc.kill()
    proc.wait()
    for name in ("ckpt.pth.tar", "checkpoint_last.pth.tar"):
        ckpt = ckpt_io.load_checkpoint(str(tmp_path / name))
        assert ckpt["epoch"] >= 1 and ckpt["w"].numel() in (10, 8_000_000)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pth.tar")
    ckpt_io.save_checkpoint({"epoch": 1, "w": torch.zeros(4)}, path)

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    with pytest.raises(PCLError, match="No space left on device.*previous checkpoint is intact"):
        ckpt_io.save_checkpoint({"epoch": 2, "w": torch.ones(4)}, path)
    monkeypatch.undo()
    assert ckpt_io.load_checkpoint(path)["epoch"] == 1
    assert ckpt_io.load_checkpoint(str(tmp_path / "checkpoint_last.pth.tar"))["epoch"] == 1
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def _corrupt_image_folder(root):
    two_class_folder(root)
    with open(os.path.join(root, "train", "class0", "broken.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    return str(root)


def test_unreadable_image_fails_with_its_name_or_is_skipped(tmp_path):
    data = _corrupt_image_folder(tmp_path / "d")
    code, err = run_main(data, *TINY, "--exp-dir", str(tmp_path / "e1"))
    assert_clean_error(code, err, "cannot read image", "broken.png", "--bad-images skip")
    code, err = run_main(data, *TINY, "--exp-dir", str(tmp_path / "e2"), "--bad-images", "skip")
    assert code == 0, err
    assert "unreadable image" in err and "broken.png" in err


def test_queue_not_divisible_by_batch(tmp_path):
    argv = [a if a != "8" else "6" for a in TINY]  # --pcl-r 6 with batch 4
    code, err = run_main(two_class_folder(tmp_path / "d"), *argv, "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "--pcl-r 6", "multiple of the global batch 4")


def test_non_finite_loss_stops_with_the_step_and_terms(tmp_path):
    code, err = run_main("--dataset", "demo", "--demo-renders", "1", *TINY, "--lr", "1e30", "--wd", "0", "--epochs",
                         "2", "--exp-dir", str(tmp_path / "e"))  # wd 0: with 1e-4, lr x wd is refused at start
    assert_clean_error(code, err, "non-finite loss at epoch", "loss_inst=", "lr=")


def test_a_second_run_in_the_same_exp_dir_is_refused_naming_the_first(tmp_path):
    from pcl.checkpoint import ExpDirLock

    with ExpDirLock(str(tmp_path)):
        with pytest.raises(PCLError, match=r"is in use by another run \(pid \d+ on "):
            fit(tiny_args(tmp_path, "--epochs", "1"))
    fit(tiny_args(tmp_path, "--epochs", "1"))  # released: the folder is usable again


def test_exp_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(PCLError, match="is a file, not a folder"):
        fit(tiny_args(path, "--epochs", "1"))


def test_real_write_failure_during_save_leaves_no_temp_and_is_one_error(tmp_path):
    """A real failing write (RLIMIT_FSIZE: the kernel refuses bytes past 64 KiB, as a full disk would) inside
    torch.save's zip writer, in a subprocess; stale temps of such crashes are removed on the next start."""
    import subprocess
    import sys as _sys

    code = f"""
import resource, signal, sys, torch
sys.path.insert(0, {ROOT!r})
from pcl import PCLError
from pcl.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    save_checkpoint({{"w": torch.zeros(1_000_000)}}, {str(tmp_path / 'ckpt.pth.tar')!r})
except PCLError as e:
    print("PCLError:", e)
"""
    out = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "PCLError: could not save checkpoint" in out.stdout, out.stdout + out.stderr
    assert "disk full?" in out.stdout
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    from pcl.checkpoint import remove_stale_temps

    (tmp_path / ".tmp_ckpt_crashed").write_bytes(b"partial")
    assert remove_stale_temps(str(tmp_path)) == [".tmp_ckpt_crashed"]


@pytest.mark.parametrize("where", ["feature pass", "k-means"])
def test_sigterm_during_the_e_step_stops_there_and_resumes_exactly(tmp_path, monkeypatch, where, tiny_run):
    """The E-step is minutes at ImageNet scale: a stop is honoured between feature batches and between
    granularities (not after the whole E-step), the epoch boundary is saved, and --resume auto redoes the E-step."""
    import pcl.cluster as cluster_mod
    from pcl.model import MoCo

    full, cut = tiny_run, tmp_path / "cut"  # full: fit(tiny_args(full)), uninterrupted
    calls = {"n": 0}
    if where == "feature pass":
        original = MoCo.encode_key

        def encode_key(self, images):
            calls["n"] += 1
            if calls["n"] == 2:  # the second feature batch of the first E-step (epoch 1)
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, images)

        monkeypatch.setattr(MoCo, "encode_key", encode_key)
    else:
        original = cluster_mod.kmeans

        def kmeans(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:  # the first E-step's first granularity (calls 1-2: the start-up check's)
                os.kill(os.getpid(), signal.SIGTERM)
            return original(*a, **k)

        monkeypatch.setattr(cluster_mod, "kmeans", kmeans)
    with pytest.raises(Preempted) as stopped:
        fit(tiny_args(cut))
    monkeypatch.undo()
    assert stopped.value.epoch == 1 and stopped.value.step == 0
    saved = ckpt_io.load_checkpoint(stopped.value.path)
    assert saved["epoch"] == 1 and saved["step"] == 0 and "cluster_result" not in saved
    if where == "feature pass":
        assert calls["n"] == 2  # stopped right after the batch in which the signal came
    else:
        assert calls["n"] == 3  # the E-step's second granularity was never clustered
    fit(tiny_args(cut, "--resume", "auto"))
    a, b = _state(full / "checkpoint_0001.pth.tar"), _state(cut / "checkpoint_0001.pth.tar")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_mid_epoch_checkpoint_refuses_another_batch_size_or_dataset(tmp_path):
    def preempt(epoch, step):
        if (epoch, step) == (1, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        fit(tiny_args(tmp_path), on_step=preempt)
    with pytest.raises(PCLError, match="saved mid-epoch with --batch-size 64; resume it with that batch size"):
        fit(tiny_args(tmp_path, "--resume", "auto", "-b", "32"))
    with pytest.raises(PCLError, match="saved mid-epoch on a training set of 1438 images, this one has 2876"):
        fit(tiny_args(tmp_path, "--resume", "auto", "--demo-renders", "2"))


def test_resume_auto_skips_a_dangling_symlink_and_bad_value_types(tmp_path, tiny_run_1ep):
    copy_run(tiny_run_1ep, tmp_path)  # fit(tiny_args(tmp_path, "--epochs", "1"))
    os.symlink(tmp_path / "gone.pth.tar", tmp_path / "checkpoint_9999.pth.tar")
    path, ckpt = ckpt_io.resolve_resume("auto", str(tmp_path))
    assert path.endswith("checkpoint_0000.pth.tar")
    ckpt["epoch"] = [1]
    with pytest.raises(PCLError, match=r"its 'epoch' is \[1\], not an epoch number"):
        ckpt_io.require_pretrain_checkpoint(ckpt, "hand.pth.tar")


def test_export_to_a_directory_is_refused(tmp_path):
    with pytest.raises(PCLError, match="is a directory: give a file name"):
        from pcl.export import export

        export("unused.pth.tar", str(tmp_path))


HTML = b"<!DOCTYPE html><html>sign in</html>"


def test_pretraining_reports_a_bad_resume_before_scanning_the_data(tmp_path):
    bad = tmp_path / "ckpt.pth.tar"
    bad.write_bytes(HTML)
    with pytest.raises(PCLError, match="is not a PyTorch checkpoint: it is an HTML"):
        fit(tiny_args(tmp_path / "run", str(tmp_path / "no_such_data"), "--resume", str(bad)))


@pytest.mark.parametrize("command", ["eval_linear.py", "eval_svm.py", "knn", "semisup"])
def test_evaluations_report_a_bad_pretrained_before_scanning_the_data(tmp_path, command, capsys):
    from pcl.config import build_linear_parser, build_svm_parser
    from pcl.launch import run_cli

    bad = tmp_path / "ckpt.pth.tar"
    bad.write_bytes(HTML)
    argv = ["--pretrained", str(bad), str(tmp_path / "no_such_data"), "--exp-dir", str(tmp_path / "out")]
    if command == "eval_linear.py":
        from pcl.evaluation.linear import fit_linear as run
        parser = build_linear_parser
    elif command == "eval_svm.py":
        from pcl.evaluation.svm import run_svm as run
        parser = build_svm_parser
        argv += ["--dataset", "voc07"]
    elif command == "knn":
        from pcl.evaluation.knn import build_parser as parser, run
    else:
        from pcl.evaluation.semisup import build_parser as parser, fit_semisup as run
        argv += ["--labels-perc", "1"]
    code = run_cli(parser, run, argv)
    err = capsys.readouterr().err
    assert code == 2 and "is not a PyTorch checkpoint" in err, err


def test_unwritable_exp_dir_is_one_line(tmp_path, monkeypatch):
    """root may write anywhere: simulate a read-only folder by refusing the directory creation."""
    from pcl.log import setup_logging

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(PCLError, match=r"--exp-dir .*/ro is not writable \(Permission denied\)"):
        setup_logging(str(tmp_path / "ro"))


def test_a_signal_after_the_last_checkpoint_says_what_happens(pcl_warnings):
    """NG02: TERM during the final --knn-eval logged 'stopping at the next safe point ..., then saving', then the run
    finished with exit 0 (nothing was lost: the message was wrong)."""
    stop = StopRequest().install()
    stop.after_training = True
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.restore()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert pcl_warnings == ["SIGTERM received after the last checkpoint was saved: nothing is lost; the final report "
                            "finishes, then the run exits"]
