"""Issue 27, silent wrong results in the evaluations: non-finite losses and features stop the run in one line,
and eval_linear.py --resume can neither measure another backbone than --pretrained's nor ignore its own arch."""

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import official_checkpoint
from pcl import PCLError
from pcl.config import build_linear_parser, parse_args
from pcl.evaluation.linear import fit_linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN_LR = "1e38"  # the head's weights overflow to inf after one step: every later loss is NaN


def linear_args(tmp_path, *extra):
    argv = ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "--epochs", "1", "-b", "128",
            "--workers", "0", "--no-progress", "--exp-dir", str(tmp_path / "lin"), *extra]
    return parse_args(build_linear_parser(), argv)


@pytest.fixture
def pretrained(tmp_path):
    official_checkpoint(tmp_path / "p.pth.tar")
    return str(tmp_path / "p.pth.tar")


# ----------------------------------------------------------------------------------------------------
# item 1: non-finite losses and features
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [[], ["--cached-features"]], ids=["official", "cached"])
def test_linear_probe_stops_at_a_nan_loss_before_saving(tmp_path, pretrained, mode):
    args = linear_args(tmp_path, "--pretrained", pretrained, "--lr", NAN_LR, "-b", "64", "--epochs", "2", *mode)
    with pytest.raises(PCLError) as err:
        fit_linear(args)
    msg = str(err.value)
    assert "\n" not in msg and "--lr" in msg
    assert re.search(r"non-finite loss at epoch 0 step 1: loss=(nan|inf) lr=1e\+38", msg)  # diverged at once
    assert not any(name.endswith(".pth.tar") for name in os.listdir(tmp_path / "lin"))


def test_semisup_fine_tuning_stops_at_a_nan_loss(tmp_path, pretrained):
    from pcl.evaluation.semisup import build_parser, fit_semisup

    args = parse_args(build_parser(), ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "--epochs", "1",
                                       "-b", "32", "--labels-perc", "10", "--pretrained", pretrained, "--lr", "0.01",
                                       "--lr-last-layer", NAN_LR, "--workers", "0", "--no-progress",
                                       "--exp-dir", str(tmp_path / "ss")])
    with pytest.raises(PCLError, match=r"non-finite loss at epoch 0 step \d+: loss=nan lr=0.01/1e\+38; lower --lr"):
        fit_semisup(args)
    assert not os.path.exists(tmp_path / "ss" / "semisup_10pct.pth.tar")


def test_loss_guard_agrees_over_ranks(monkeypatch):
    """A rank whose own losses are finite raises too, at the same check, when another rank saw a NaN."""
    from pcl.evaluation import common

    guard = common.LossGuard("cpu", every=5)
    monkeypatch.setattr(common.dist_utils, "all_reduce_sum", lambda t: t.fill_(1.0))  # the other rank's flag
    guard.watch(torch.tensor(2.3), 0, 1, 5.0)  # not a check step: no collective, no error
    with pytest.raises(PCLError, match="non-finite loss on another rank by epoch 0 step 5"):
        guard.watch(torch.tensor(2.3), 0, 5, 5.0)
    monkeypatch.setattr(common.dist_utils, "all_reduce_sum", lambda t: t)
    guard = common.LossGuard("cpu", every=100)
    for step, loss in enumerate([2.0, float("inf"), float("nan")]):
        guard.watch(torch.tensor(loss), 3, step + 1, 5.0)  # steps 1..3: no check yet
    with pytest.raises(PCLError, match=r"^non-finite loss at epoch 3 step 2: loss=inf lr=5; lower --lr"):
        guard.check(3, 3, 5.0)


def test_linear_probe_nan_loss_with_two_processes_stops_both(tmp_path, pretrained):
    from conftest import free_port

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval_linear.py"), "--dataset", "demo", "--demo-renders",
                           "1", "--image-size", "16", "--epochs", "1", "-b", "64", "--workers", "0", "--no-progress",
                           "--lr", NAN_LR, "--pretrained", pretrained, "--dist-url", f"tcp://127.0.0.1:{free_port()}",
                           "--multiprocessing-distributed", "--world-size", "1", "--rank", "0", "--nproc", "2",
                           "--exp-dir", str(tmp_path / "lin")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "non-finite loss at epoch 0 step 1" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "lin" / "linear_checkpoint.pth.tar")


def test_knn_refuses_nan_features_naming_the_checkpoint(tmp_path, capsys, pretrained):
    from pcl.evaluation.knn import build_parser, run
    from pcl.launch import main

    ckpt = torch.load(pretrained, weights_only=True)
    ckpt["state_dict"]["module.encoder_q.bn1.running_var"].fill_(-1.0)  # finite weights, NaN features
    torch.save(ckpt, tmp_path / "broken.pth.tar")
    code = main(build_parser, run, ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "--workers", "0",
                                    "--pretrained", str(tmp_path / "broken.pth.tar"), "--exp-dir", str(tmp_path / "k")],
                one_process="python -m pcl.evaluation.knn")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "NaN/inf" in err and "broken.pth.tar" in err
    assert not os.path.exists(tmp_path / "k" / "knn.json")


# ----------------------------------------------------------------------------------------------------
# item 2: --resume against --pretrained and the architecture flags
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def trained_head(tmp_path, pretrained):
    """One official-protocol epoch on --pretrained p.pth.tar: (its result, the linear checkpoint path)."""
    out = fit_linear(linear_args(tmp_path, "--pretrained", pretrained))
    return out, str(tmp_path / "lin" / "linear_checkpoint.pth.tar")


def test_resume_trained_on_another_pretrained_is_refused(tmp_path, pretrained, trained_head):
    official_checkpoint(tmp_path / "other.pth.tar", seed=1)
    for extra in (["--evaluate"], []):
        with pytest.raises(PCLError) as err:
            fit_linear(linear_args(tmp_path, "--pretrained", str(tmp_path / "other.pth.tar"), "--resume",
                                   trained_head[1], *extra))
        msg = str(err.value)
        assert "\n" not in msg and "other.pth.tar" in msg and pretrained in msg


def test_resume_without_a_recorded_pretrained_warns_and_compares_weights(tmp_path, pretrained, trained_head, capsys):
    ckpt = torch.load(trained_head[1], weights_only=True)
    official = {k: ckpt[k] for k in ("epoch", "arch", "state_dict", "best_acc1", "optimizer")}  # eval_cls_imagenet.py's
    torch.save(official, tmp_path / "official_head.pth.tar")
    again = fit_linear(linear_args(tmp_path, "--pretrained", pretrained, "--evaluate", "--resume",
                                   str(tmp_path / "official_head.pth.tar")))
    assert again["top1"] == pytest.approx(trained_head[0]["top1"])
    assert "does not record its pretrained checkpoint" in capsys.readouterr().err
    official_checkpoint(tmp_path / "other.pth.tar", seed=1)
    with pytest.raises(PCLError, match="was not trained on --pretrained .*other.pth.tar"):
        fit_linear(linear_args(tmp_path, "--pretrained", str(tmp_path / "other.pth.tar"), "--evaluate", "--resume",
                               str(tmp_path / "official_head.pth.tar")))


def test_evaluate_resume_uses_the_checkpoints_arch_and_refuses_a_contradicting_flag(tmp_path, trained_head):
    again = fit_linear(linear_args(tmp_path, "--evaluate", "--resume", trained_head[1]))  # no --pretrained, no -a
    assert again["top1"] == pytest.approx(trained_head[0]["top1"])
    with pytest.raises(PCLError, match=r"^-a/--arch resnet50 contradicts --resume .*resnet18"):
        fit_linear(linear_args(tmp_path, "-a", "resnet50", "--evaluate", "--resume", trained_head[1]))
    with pytest.raises(PCLError, match=r"^--width 32 contradicts --resume .*width 64"):
        fit_linear(linear_args(tmp_path, "--width", "32", "--evaluate", "--resume", trained_head[1]))
