"""--wandb: the RunLog sinks' scalars, histograms and galleries go to W&B too, the run id is kept in the checkpoints
and --resume auto continues the same W&B run. With the wandb package: in offline mode (never a server); without it,
through a stand-in module that records the calls, so that the wiring is tested wherever the suite runs."""

import glob
import os
import sys
import types

import pytest

from conftest import assert_clean_error, run_main, tiny_args
from pcl.checkpoint import load_checkpoint


def recording_wandb():
    """A module with wandb's surface as pcl uses it (init, run.log/finish, Histogram, Image, Html), recording calls."""
    module = types.ModuleType("wandb")
    module.inits, module.runs = [], []

    class Run:
        def __init__(self, run_id):
            self.id, self.logged, self.finished = run_id, [], False

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    def init(**kwargs):
        module.inits.append(kwargs)
        module.runs.append(Run(kwargs["id"] or f"run{len(module.runs)}"))
        return module.runs[-1]

    module.init = init
    for name in ("Histogram", "Image", "Html"):
        setattr(module, name, type(name, (), {"__init__": lambda self, data: setattr(self, "data", data)}))
    return module


def train(exp, *extra):
    from pcl.engine import fit

    return fit(tiny_args(exp, "--warmup-epoch", "0", "--wandb", "--wandb-project", "pcl-tests", *extra))


def test_wandb_gets_the_scalars_histograms_and_galleries_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    wandb = recording_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    train(tmp_path, "--epochs", "1")
    first = wandb.runs[0]
    assert wandb.inits[0]["id"] is None and wandb.inits[0]["project"] == "pcl-tests"
    assert wandb.inits[0]["config"]["num_cluster"] == [10, 20] and first.finished
    logged = {key: value for step, values in first.logged for key, value in values.items()}
    assert {"train/loss", "train/nmi_k10", "cluster/k10_size_max"} <= set(logged)
    assert type(logged["cluster/k10_phi"]).__name__ == "Histogram" and type(logged["prototypes/k20"]).__name__ == "Image"
    assert logged["prototypes/k20"].data.ndim == 3 and logged["prototypes/k20"].data.shape[2] == 3  # H x W x 3
    assert load_checkpoint(str(tmp_path / "checkpoint_last.pth.tar"))["wandb_id"] == first.id

    train(tmp_path, "--epochs", "2", "--resume", "auto")
    again = wandb.runs[1]
    assert wandb.inits[1]["id"] == first.id and wandb.inits[1]["resume"] == "allow"
    assert {step for step, _ in again.logged} == {1}
    assert load_checkpoint(str(tmp_path / "checkpoint_0001.pth.tar"))["wandb_id"] == first.id


def test_wandb_without_the_package_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code, err = run_main("--dataset", "demo", "--wandb", "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "--wandb needs the wandb package: pip install wandb")
    assert not os.path.exists(tmp_path / "e" / "log.txt")


def test_offline_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    exp = tmp_path / "exp"
    train(exp, "--epochs", "1")
    run_id = load_checkpoint(str(exp / "checkpoint_last.pth.tar"))["wandb_id"]
    train(exp, "--epochs", "2", "--resume", "auto")
    assert load_checkpoint(str(exp / "checkpoint_last.pth.tar"))["wandb_id"] == run_id
    runs = sorted(glob.glob(str(exp / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs)
    for folder in runs:
        data = open(glob.glob(os.path.join(folder, "*.wandb"))[0], "rb").read()
        assert b"train/loss" in data and b"prototypes/k10" in data
