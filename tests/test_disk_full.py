"""A full disk outside torch.save: one line, no traceback, nothing half-written (issue 27)."""

import errno
import json
import logging
import os

import pytest
from PIL import Image

from pcl import PCLError


@pytest.fixture(autouse=True)
def pcl_propagates(monkeypatch):
    """The 'pcl' logger does not propagate once setup_logging ran: let caplog see its records."""
    monkeypatch.setattr(logging.getLogger("pcl"), "propagate", True)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def half_then_no_space(obj, f, **kwargs):
    """json.dump on a disk that fills after the first bytes."""
    f.write('{"half": ')
    no_space()


@pytest.mark.parametrize("where", ["write", "replace"])
def test_write_atomic_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, where):
    from pcl.log import write_json

    path = tmp_path / "r.json"
    path.write_text('{"old": 1}')
    monkeypatch.setattr(json, "dump", half_then_no_space) if where == "write" else \
        monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(PCLError) as e:
        write_json(str(path), {"new": 2})
    assert str(e.value) == f"could not write {path} (No space left on device)"
    assert os.listdir(tmp_path) == ["r.json"] and path.read_text() == '{"old": 1}'


def test_knn_results_json_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import torch

    from pcl.evaluation import knn
    from pcl.launch import run_cli

    x = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)
    y = torch.arange(20) % 2
    monkeypatch.setattr(knn, "labelled_features", lambda cfg: (x, y, x, y))
    monkeypatch.setattr(json, "dump", half_then_no_space)
    exp = tmp_path / "exp"
    code = run_cli(knn.build_parser, knn.run, ["--dataset", "demo", "--knn-k", "3", "--exp-dir", str(exp)])
    err = capsys.readouterr().err
    assert code == 2 and f"could not write {exp / 'knn.json'} (No space left on device)" in err
    assert "Traceback" not in err and not (exp / "knn.json").exists()
    assert not [n for n in os.listdir(exp) if n.startswith(".tmp")]


def test_cluster_metrics_results_json_on_a_full_disk(tmp_path, monkeypatch):
    import torch

    from pcl.config import parse_args
    from pcl.evaluation import cluster_metrics

    x = torch.nn.functional.normalize(torch.randn(40, 4), dim=1)
    monkeypatch.setattr(cluster_metrics, "labelled_features", lambda cfg, splits: (x, torch.arange(40) % 2, None, None))
    monkeypatch.setattr(json, "dump", half_then_no_space)
    exp = tmp_path / "exp"
    args = parse_args(cluster_metrics.build_parser(), ["--dataset", "demo", "--exp-dir", str(exp)])
    with pytest.raises(PCLError, match=r"^could not write .*cluster_metrics.json \(No space left on device\)$"):
        cluster_metrics.run(args)
    assert [n for n in os.listdir(exp) if n.endswith(".json") or n.startswith(".tmp")] == []


def test_png_writers_on_a_full_disk(tmp_path, monkeypatch):
    import torch

    from pcl.evaluation import visualize

    monkeypatch.setattr(Image.Image, "save", no_space)
    path = tmp_path / "g.png"
    with pytest.raises(PCLError, match=r"^could not write .*g.png \(No space left on device\)$"):
        visualize.save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), str(path))
    assert os.listdir(tmp_path) == []


def test_tsne_savefig_on_a_full_disk(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    import torch
    from matplotlib.figure import Figure

    from pcl.evaluation import visualize

    monkeypatch.setattr(Figure, "savefig", no_space)
    feats = torch.nn.functional.normalize(torch.randn(12, 4), dim=1)
    labels = torch.arange(12) % 2
    with pytest.raises(PCLError, match=r"^could not write .*t.png \(No space left on device\)$"):
        visualize.tsne_figure(feats, labels, labels, str(tmp_path / "t.png"), 0, "t")
    assert os.listdir(tmp_path) == []


def test_runlog_record_on_a_full_disk_warns_once_and_keeps_running(tmp_path, monkeypatch, caplog):
    from pcl.log import RunLog

    log = RunLog(str(tmp_path), tensorboard=False)
    log.record({"epoch": 0})
    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:5])  # the disk fills mid-line
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda p, *a, **k: FullFile(real_open(p, *a, **k)))
    with caplog.at_level(logging.WARNING, logger="pcl"):
        log.record({"epoch": 1})
        log.record({"epoch": 2})
    monkeypatch.setattr("builtins.open", real_open)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"could not write {tmp_path / 'log.txt'} (No space left on device): epoch stats go to the "
                        f"console/TensorBoard only"]
    assert (tmp_path / "log.txt").read_text() == '{"epoch": 0}\n'  # the partial line is cut off again
    log.record({"epoch": 3})  # space again: the log goes on
    assert (tmp_path / "log.txt").read_text().splitlines() == ['{"epoch": 0}', '{"epoch": 3}']


def test_runlog_tensorboard_on_a_full_disk_is_one_warning_then_off(tmp_path, monkeypatch, caplog):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from pcl.log import RunLog

    log = RunLog(str(tmp_path))
    monkeypatch.setattr(SummaryWriter, "add_scalar", no_space)
    with caplog.at_level(logging.WARNING, logger="pcl"):
        log.scalars(1, {"a": 1.0, "b": 2.0})
        log.scalars(2, {"a": 1.0})
        log.text("t", "x", 2)
        log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"could not write {tmp_path / 'tb'} (No space left on device): TensorBoard is off for this run"]
    monkeypatch.setattr(SummaryWriter, "__init__", no_space)
    with caplog.at_level(logging.WARNING, logger="pcl"):
        assert RunLog(str(tmp_path / "b")).writer is None
    assert len([r for r in caplog.records if "TensorBoard is off" in r.getMessage()]) == 2


def test_train_log_on_a_full_disk_is_one_stderr_line(tmp_path, capsys):
    from pcl.log import setup_logging

    logger = setup_logging(str(tmp_path))
    handler = [h for h in logger.handlers if isinstance(h, logging.FileHandler)][0]

    def emit_fails(record):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            handler.handleError(record)

    handler.emit = emit_fails
    for i in range(3):
        logger.info("step %d", i)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "train.log" in ln or "Logging error" in ln or "Traceback" in ln]
    assert lines == [f"could not write {tmp_path / 'train.log'} (No space left on device): the log goes to the "
                     f"console only"]
    logger.handlers.clear()


@pytest.mark.parametrize("module", ["knn", "svm", "cluster_metrics", "visualize"])
def test_evaluation_results_go_through_the_atomic_writer(module):
    """No evaluation opens a results file itself (svm's run is too slow to fill a disk under in a unit test)."""
    from conftest import ROOT

    text = open(os.path.join(ROOT, "pcl", "evaluation", f"{module}.py")).read()
    assert not [s for s in ('"w")', "json.dump(", ".savefig(path", ".save(path)") if s in text]
    assert "write_json(" in text or "write_atomic(" in text


def test_tensorboards_writer_thread_dying_of_a_full_disk_is_one_warning_at_once(tmp_path, capsys, pcl_warnings):
    """WD01/WD02/NT04: the writer thread printed 'Exception in thread ...' with an OSError traceback (in WD01 into
    the middle of a log line), and 'TensorBoard is off' came only at the next epoch's write."""
    import threading

    from pcl.log import RunLog

    before = threading.excepthook
    log = RunLog(str(tmp_path))
    thread = log.writer.file_writer.event_writer._async_writer._worker  # tensorboard's event-file writer thread

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    thread._record_writer.write = full
    log.scalars(0, {"loss": 1.0})
    thread.join(10)
    assert not thread.is_alive()
    assert pcl_warnings == [f"could not write {tmp_path / 'tb'} (No space left on device): TensorBoard is off for "
                            f"this run"]
    log.scalars(1, {"loss": 0.5})  # the dead writer is dropped without a second word
    log.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert len(pcl_warnings) == 1 and threading.excepthook is before
