"""Issue 27, no lost work, in the checkpoint files: --resume auto takes the furthest checkpoint whatever the mtimes
say, an export never replaces its own pretraining checkpoint, checkpoints get the user's umask, and a full disk at
the lock's pid line is one error line."""

import errno
import logging
import os
import shutil
import stat

import pytest
import torch

import pcl.checkpoint as ckpt_io
from conftest import official_checkpoint
from pcl import PCLError
from pcl.export import build_export_parser, run_export, export
from pcl.launch import run_cli


def _save(folder, name, epoch, step=0, mtime=None):
    path = os.path.join(folder, name)
    ckpt_io.save_checkpoint({"epoch": epoch, "step": step, "state_dict": {"w": torch.full((2,), float(epoch))}},
                            path, last=None)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def pcl_log(caplog):
    logging.getLogger("pcl").addHandler(caplog.handler)  # the pcl logger does not propagate to the root
    caplog.set_level(logging.INFO, logger="pcl")
    yield caplog
    logging.getLogger("pcl").removeHandler(caplog.handler)


def test_resume_auto_takes_the_highest_epoch_not_the_newest_mtime(tmp_path, pcl_log):
    folder, now = str(tmp_path), 1_700_000_000
    _save(folder, "checkpoint_0003.pth.tar", 4, mtime=now - 300)  # the furthest, but cp -r/touch made it oldest
    _save(folder, "checkpoint_0000.pth.tar", 1, mtime=now)
    _save(folder, "checkpoint_preempt.pth.tar", 3, step=7, mtime=now - 100)  # epoch 3 interrupted: before (4, 0)
    _save(folder, "checkpoint_0002.pth.tar", 3, mtime=now - 50)
    path, ckpt = ckpt_io.resolve_resume("auto", folder)
    assert os.path.basename(path) == "checkpoint_0003.pth.tar" and ckpt["epoch"] == 4
    assert "highest epoch" in pcl_log.text and "checkpoint_0003.pth.tar" in pcl_log.text
    os.remove(path)  # now the mid-epoch (3, 7) is further than the epoch-boundary (3, 0) though older
    path, ckpt = ckpt_io.resolve_resume("auto", folder)
    assert os.path.basename(path) == "checkpoint_preempt.pth.tar" and (ckpt["epoch"], ckpt["step"]) == (3, 7)


def test_resume_auto_breaks_an_epoch_tie_by_mtime_and_skips_an_unreadable_furthest_file(tmp_path, pcl_log):
    folder, now = str(tmp_path), 1_700_000_000
    _save(folder, "checkpoint_0001.pth.tar", 2, mtime=now - 10)
    shutil.copy(os.path.join(folder, "checkpoint_0001.pth.tar"), os.path.join(folder, ckpt_io.LAST))
    os.utime(os.path.join(folder, ckpt_io.LAST), (now, now))
    good = open(os.path.join(folder, "checkpoint_0001.pth.tar"), "rb").read()
    with open(os.path.join(folder, "checkpoint_0009.pth.tar"), "wb") as f:
        f.write(good[: len(good) // 2])
    os.utime(os.path.join(folder, "checkpoint_0009.pth.tar"), (now - 500, now - 500))
    path, ckpt = ckpt_io.resolve_resume("auto", folder)
    assert os.path.basename(path) == ckpt_io.LAST and ckpt["epoch"] == 2
    assert "skipping" in pcl_log.text and "checkpoint_0009" in pcl_log.text


@pytest.fixture
def pretrain(tmp_path):
    official_checkpoint(tmp_path / "p.pth.tar", arch="resnet18")
    return str(tmp_path / "p.pth.tar")


def _same_file_names(tmp_path, pretrain):
    os.symlink(pretrain, tmp_path / "link.pth.tar")
    os.link(pretrain, tmp_path / "hard.pth.tar")
    os.makedirs(tmp_path / "sub")
    return [pretrain, str(tmp_path / "link.pth.tar"), str(tmp_path / "hard.pth.tar"),
            os.path.join(str(tmp_path), "sub", "..", "p.pth.tar")]


def test_export_onto_its_own_checkpoint_is_refused_before_writing(tmp_path, pretrain, capsys):
    before = open(pretrain, "rb").read()
    for out in _same_file_names(tmp_path, pretrain):
        with pytest.raises(PCLError, match="is the input checkpoint") as refused:
            export(pretrain, out)
        assert "\n" not in str(refused.value) and out in str(refused.value)
        with pytest.raises(PCLError, match="is the input checkpoint"):
            export(out, pretrain, force=True)  # --force does not make it one
    assert run_cli(build_export_parser, run_export, [pretrain, pretrain]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the input checkpoint" in err
    assert open(pretrain, "rb").read() == before
    assert ckpt_io.checkpoint_kind(ckpt_io.load_checkpoint(pretrain)) == "pretrain"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_export_over_another_pretraining_checkpoint_needs_force(tmp_path, pretrain, capsys):
    other = str(tmp_path / "other.pth.tar")
    official_checkpoint(other, arch="resnet18", seed=1)
    with pytest.raises(PCLError, match="is a pretraining checkpoint .*pass --force"):
        export(pretrain, other)
    assert ckpt_io.checkpoint_kind(ckpt_io.load_checkpoint(other)) == "pretrain"
    assert run_cli(build_export_parser, run_export, [pretrain, other, "--force"]) == 0
    assert "state_dict" not in ckpt_io.load_checkpoint(other)  # now the bare backbone
    export(pretrain, other)  # a bare backbone (an earlier export) is overwritten without --force
    (tmp_path / "old.pkl").write_bytes(b"not a checkpoint")
    export(pretrain, str(tmp_path / "old.pkl"), "detectron2")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        ckpt_io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(1)}}, str(tmp_path / "c.pth.tar"))
    finally:
        os.umask(old)
    for name in ("c.pth.tar", ckpt_io.LAST):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
    assert os.umask(old) == old  # the process umask is left as it was


class _FullDisk:
    """A lock file whose ``write`` or ``flush`` fails as on a full disk (buffered: close flushes and fails too)."""

    def __init__(self, real, failing):
        self._real, self._failing = real, failing

    def __getattr__(self, name):
        if name == self._failing:
            return self._fail
        return getattr(self._real, name)

    def _fail(self, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["write", "flush"])
def test_a_full_disk_at_the_lock_pid_line_is_one_error_line(tmp_path, monkeypatch, failing):
    real_open = open
    monkeypatch.setattr(ckpt_io, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), failing), raising=False)
    lock = ckpt_io.ExpDirLock(str(tmp_path / "exp"))
    with pytest.raises(PCLError, match=r"--exp-dir .*exp: could not write .*No space left on device.*free space") \
            as refused:
        lock.__enter__()
    assert "\n" not in str(refused.value) and lock.file is None and not lock.locked
    monkeypatch.undo()
    with ckpt_io.ExpDirLock(str(tmp_path / "exp")) as again:  # the failed one released the lock
        assert again.locked
