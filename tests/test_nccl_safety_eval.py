"""Issue 24 (safe on a real 8-GPU NCCL node): the experiment-folder lock on filesystems without flock, and the
evaluation commands' spawned workers logging as their own rank (only global rank 0 writes train.log)."""

import errno
import fcntl
import logging
import os

import pytest
import torch

from pcl import PCLError, distributed as dist_utils
from pcl.checkpoint import ExpDirLock
from pcl.config import build_linear_parser, parse_args
from pcl.evaluation.common import prepare_eval, setup_eval_logging


@pytest.fixture
def lock_log(caplog, monkeypatch):
    """Records of pcl.checkpoint, each once (the pcl logger may not propagate to the root, where caplog listens)."""
    log = logging.getLogger("pcl.checkpoint")
    monkeypatch.setattr(log, "propagate", False)
    log.addHandler(caplog.handler)
    yield caplog
    log.removeHandler(caplog.handler)


def _failing_flock(exc):
    def flock(fd, op):
        raise exc

    return flock


@pytest.mark.parametrize("code", ["ENOSYS", "EOPNOTSUPP", "ENOLCK", "EINVAL"])
def test_a_filesystem_without_flock_runs_unlocked_with_one_warning(tmp_path, monkeypatch, lock_log, code):
    number = getattr(errno, code)
    monkeypatch.setattr(fcntl, "flock", _failing_flock(OSError(number, os.strerror(number))))
    folder = str(tmp_path / "exp")
    with ExpDirLock(folder) as lock:
        assert not lock.locked
        with open(os.path.join(folder, ".lock")) as f:
            assert f.read().startswith(f"pid {os.getpid()} on ")
    assert lock.file is None  # __exit__ closed the unlocked file
    warnings = [r for r in lock_log.records if r.name == "pcl.checkpoint" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    name = errno.errorcode[number]  # EOPNOTSUPP is ENOTSUP on Linux
    assert folder in text and name in text and "no protection against a second run in this folder" in text


@pytest.mark.parametrize("exc", [BlockingIOError(errno.EWOULDBLOCK, "would block"),
                                 BlockingIOError(errno.EAGAIN, "try again"),
                                 PermissionError(errno.EACCES, "permission denied")])
def test_would_block_still_means_in_use_by_another_run(tmp_path, monkeypatch, lock_log, exc):
    monkeypatch.setattr(fcntl, "flock", _failing_flock(exc))
    with pytest.raises(PCLError, match="is in use by another run"):
        ExpDirLock(str(tmp_path)).__enter__()
    assert not [r for r in lock_log.records if r.name == "pcl.checkpoint"]


def test_a_real_second_lock_in_the_same_folder_is_refused_while_the_first_is_held(tmp_path):
    with ExpDirLock(str(tmp_path)):
        with pytest.raises(PCLError, match=r"is in use by another run \(pid \d+ on .*give another --exp-dir"):
            ExpDirLock(str(tmp_path)).__enter__()
    with ExpDirLock(str(tmp_path)) as again:  # released: usable again
        assert again.locked


@pytest.fixture
def pcl_logger(monkeypatch):
    """The pcl logger as each test found it (setup_logging replaces its handlers and level)."""
    monkeypatch.delenv("RANK", raising=False)  # torchrun's RANK would take precedence over the spawn rank
    log = logging.getLogger("pcl")
    saved = log.handlers[:], log.level, log.propagate
    yield log
    for h in log.handlers:
        if h not in saved[0]:
            h.close()
    log.handlers[:], log.level, log.propagate = saved


def _spawned(tmp_path, parser=build_linear_parser, **changes):
    """Settings of a worker of the spawn launcher (launch() sets nproc and local_rank)."""
    cfg = parse_args(parser(), ["--dataset", "demo", "--exp-dir", str(tmp_path / "e"), "--multiprocessing-distributed"])
    return cfg.replace(**{"multiprocessing_distributed": True, "nproc": 2, "rank": 0, "world_size": 1, **changes})


def _file_handlers(log):
    return [h for h in log.handlers if isinstance(h, logging.FileHandler)]


def test_a_spawned_eval_worker_other_than_rank_0_logs_as_its_rank_without_train_log(tmp_path, pcl_logger, capsys):
    log = setup_eval_logging(_spawned(tmp_path, local_rank=1))
    assert log.level == logging.WARNING and not _file_handlers(log)
    assert not (tmp_path / "e" / "train.log").exists()
    log.info("not shown")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "[rank 1] shown" in err and "not shown" not in err


def test_the_node_rank_counts_in_a_spawned_eval_workers_rank(tmp_path, pcl_logger, capsys):
    log = setup_eval_logging(_spawned(tmp_path, local_rank=0, rank=1, world_size=2))
    log.warning("second node")
    assert log.level == logging.WARNING and "[rank 2] second node" in capsys.readouterr().err
    assert not (tmp_path / "e" / "train.log").exists()


def test_spawned_eval_global_rank_0_logs_info_to_train_log(tmp_path, pcl_logger):
    log = setup_eval_logging(_spawned(tmp_path, local_rank=0))
    assert log.level == logging.INFO
    assert [h.baseFilename for h in _file_handlers(log)] == [str(tmp_path / "e" / "train.log")]
    log.info("rank zero")
    for h in log.handlers:
        h.flush()
    assert "[rank 0] rank zero" in (tmp_path / "e" / "train.log").read_text()


def _semisup_parser():
    from pcl.evaluation.semisup import build_parser

    return build_parser()


@pytest.mark.parametrize("parser", [build_linear_parser, _semisup_parser], ids=["linear", "semisup"])
def test_prepare_eval_of_both_spawning_commands_uses_the_workers_rank(tmp_path, pcl_logger, monkeypatch, parser):
    """fit_linear and fit_semisup set up through prepare_eval; the process group itself is not joined here."""
    monkeypatch.setattr(dist_utils, "init", lambda args: torch.device("cpu"))
    assert prepare_eval(_spawned(tmp_path, parser, local_rank=1)) == torch.device("cpu")
    assert pcl_logger.level == logging.WARNING and not _file_handlers(pcl_logger)
    assert "[rank 1]" in pcl_logger.handlers[0].formatter._fmt
    assert not (tmp_path / "e" / "train.log").exists()
