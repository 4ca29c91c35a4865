"""Work that must not be lost to the accidents real users have: a Ctrl-C, a rerun without --resume auto in a
finished run's folder, a divergence in the epoch's last update."""

import os
import signal

import pytest
import torch

from conftest import copy_run, tiny_args
from pcl import PCLError, Preempted
from pcl.checkpoint import load_checkpoint
from pcl.engine import fit
from pcl.preemption import StopRequest


def test_the_first_ctrl_c_saves_as_sigterm_does(tmp_path):
    def ctrl_c(epoch, step):
        if (epoch, step) == (1, 2):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Preempted) as stopped:
        fit(tiny_args(tmp_path), on_step=ctrl_c)
    assert (stopped.value.epoch, stopped.value.step) == (1, 3)
    saved = load_checkpoint(stopped.value.path)
    assert saved["epoch"] == 1 and saved["step"] == 3
    assert "SIGINT received" in (tmp_path / "PREEMPTED").read_text()


def test_a_second_ctrl_c_a_moment_later_aborts_and_an_echo_does_not(monkeypatch):
    import pcl.preemption

    clock = [100.0]
    monkeypatch.setattr(pcl.preemption.time, "monotonic", lambda: clock[0])
    stop = StopRequest().install()  # os.kill runs the handler before it returns (the signal is to this process)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        clock[0] += 0.2  # torchrun forwarding the same press
        os.kill(os.getpid(), signal.SIGINT)
        clock[0] += 1.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM after a Ctrl-C: still one stop, named by the first signal
        assert stop.signal_name == "SIGINT"
    finally:
        stop.restore()


def test_weights_that_diverged_in_the_last_update_are_not_saved(tmp_path, monkeypatch):
    import pcl.engine

    real = pcl.engine.train_one_epoch

    def blow_up(model, *args, **kwargs):  # the epoch's last update took the weights to 1e28, every loss finite
        stats = real(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).mul_(1e30)
        return stats

    monkeypatch.setattr(pcl.engine, "train_one_epoch", blow_up)
    with pytest.raises(PCLError, match=r"the weights diverged by epoch 0 step 0 \(largest \|w\| = .*e\+2\d\)"):
        fit(tiny_args(tmp_path, "--save-freq", "1"))
    assert not list(tmp_path.glob("checkpoint_*"))


def test_a_fresh_run_never_writes_over_another_runs_checkpoints(tmp_path, tiny_run_1ep):
    copy_run(tiny_run_1ep, tmp_path)  # fit(tiny_args(tmp_path, "--epochs", "1"))
    before = (tmp_path / "checkpoint_last.pth.tar").read_bytes()
    with pytest.raises(PCLError, match=r"holds another run's checkpoints \(checkpoint_0000.pth.tar, checkpoint_last"
                                       r".pth.tar\): continue it with --resume auto, choose another --exp-dir, or "
                                       r"pass --overwrite"):
        fit(tiny_args(tmp_path, "--epochs", "1", "--lr", "0.1"))
    assert (tmp_path / "checkpoint_last.pth.tar").read_bytes() == before
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 1  # the logs do not mix either
    fit(tiny_args(tmp_path, "--epochs", "1", "--lr", "0.1", "--overwrite"))
    assert (tmp_path / "checkpoint_last.pth.tar").read_bytes() != before


def test_the_preempt_checkpoint_resumed_from_is_removed_once_the_run_is_past_it(tmp_path):
    def preempt(epoch, step):
        if (epoch, step) == (0, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        fit(tiny_args(tmp_path, "--save-freq", "1"), on_step=preempt)
    assert (tmp_path / "checkpoint_preempt.pth.tar").exists()
    fit(tiny_args(tmp_path, "--save-freq", "1", "--resume", "auto"))
    assert not (tmp_path / "checkpoint_preempt.pth.tar").exists()
    assert load_checkpoint(tmp_path / "checkpoint_last.pth.tar")["epoch"] == 2


def test_a_rendezvous_that_nobody_joins_is_one_line(tmp_path):
    import socket

    from pcl import distributed as dist_utils
    from pcl.config import validate_pretrain_args

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = validate_pretrain_args(tiny_args(tmp_path, "--dist-url", f"tcp://127.0.0.1:{port}", "--world-size", "2",
                                           "--rank", "0", "--dist-timeout", "0.05"))
    with pytest.raises(PCLError, match=r"rank 0 waited --dist-timeout 0.05 min at tcp://127.0.0.1:\d+, but only 1 of "
                                       r"2 processes joined: start every process"):
        dist_utils.init(cfg)
