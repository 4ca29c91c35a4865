"""What the paper's GPU run relies on, checked on the CPU: official optimizer/checkpoint interchangeability,
per-node loader workers, cuDNN flags, and no optional rank-0 work at every E-step."""

import os

import pytest
import torch

from conftest import copy_run, tiny_args
from pcl import PCLError
from pcl import distributed as dist_utils
from pcl.checkpoint import load_checkpoint
from pcl.config import validate_pretrain_args
from pcl.engine import fit, setup
from pcl.resume import load_into


def _official_resume_file(path, args):
    """What the official main_pcl.py saves after some steps: SGD over model.parameters() (the frozen key
    encoder's included), DDP-prefixed weights, epoch = the epoch to resume at."""
    _, _, model, _ = setup(validate_pretrain_args(args))
    official_opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=1e-4)
    for scale in (1.0, 2.0):  # two steps: non-trivial momentum buffers
        official_opt.zero_grad()
        loss = sum((p * p).sum() * scale for p in model.encoder_q.parameters())
        loss.backward()
        official_opt.step()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state, "optimizer": official_opt.state_dict()}, path)
    return model, official_opt


def test_official_checkpoint_resumes_here_with_its_momentum_and_ours_loads_there(tmp_path):
    path = tmp_path / "official.pth.tar"
    official_model, official_opt = _official_resume_file(path, tiny_args(tmp_path / "a"))
    _, _, model, optimizer = setup(validate_pretrain_args(tiny_args(tmp_path / "b")))
    load_into(str(path), model, optimizer, torch.device("cpu"))
    saved = official_opt.state_dict()["state"]
    params = list(model.parameters())
    assert len(optimizer.param_groups[0]["params"]) == len(params)  # all of them, as official
    assert len(saved) == sum(p.requires_grad for p in params)  # momentum for the query encoder only
    for i, p in enumerate(params):
        if i in saved:
            assert torch.equal(optimizer.state[p]["momentum_buffer"], saved[i]["momentum_buffer"])
    # end to end: --resume of the official file continues at its epoch through an E-step
    stats = fit(tiny_args(tmp_path / "c", "--resume", str(path)))
    assert stats["epoch"] == 1 and "loss_proto" in stats
    ours = load_checkpoint(tmp_path / "c" / "checkpoint_last.pth.tar")
    # ours there: the official optimizer (over model.parameters()) takes our state as it is
    there = torch.optim.SGD(official_model.parameters(), 0.05, momentum=0.9, weight_decay=1e-4)
    there.load_state_dict(ours["optimizer"])
    for p in official_model.encoder_q.parameters():
        assert there.state[p]["momentum_buffer"].shape == p.shape


def test_optimizer_state_over_trainable_parameters_only_still_resumes(tmp_path):
    """Checkpoints written before the official optimizer layout was adopted held the query encoder only."""
    from pcl.checkpoint import load_optimizer_state

    _, _, model, optimizer = setup(validate_pretrain_args(tiny_args(tmp_path)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    old = torch.optim.SGD(trainable, 0.05, momentum=0.9)
    sum((p * p).sum() for p in trainable).backward()
    old.step()
    load_optimizer_state(optimizer, model, old.state_dict(), "old.pth.tar")
    for p in trainable:
        assert torch.equal(optimizer.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"])
    wrong = torch.optim.SGD(trainable[:3], 0.05, momentum=0.9).state_dict()
    with pytest.raises(PCLError, match="optimizer state does not fit"):
        load_optimizer_state(optimizer, model, wrong, "wrong.pth.tar")


def test_workers_are_per_node_as_official(monkeypatch):
    assert dist_utils.workers_per_process(32, 8) == 4
    assert dist_utils.workers_per_process(10, 4) == 3  # rounded up, as official
    args = tiny_args("unused", "--multiprocessing-distributed", "--nproc", "4")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dist_utils.local_processes(args) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun
    assert dist_utils.local_processes(args) == 8


def test_seed_given_only_when_asked_and_defaults_to_zero():
    a, b = tiny_args("unused"), tiny_args("unused", "--seed", "3")
    assert (a.seed, a.seed_given) == (0, False) and (b.seed, b.seed_given) == (3, True)


def test_estep_logs_nmi_without_the_hungarian_table(tmp_path, monkeypatch):
    """Rank 0 must not build a k x classes table at every E-step while the other ranks wait."""
    import pcl.features as cm

    def refuse(*_):
        raise AssertionError("Hungarian accuracy computed during pretraining")

    monkeypatch.setattr(cm, "cluster_accuracy", refuse)
    stats = fit(tiny_args(tmp_path, "--epochs", "1", "--warmup-epoch", "0"))  # the E-step in epoch 0
    assert "nmi_k10" in stats and not any(k.startswith("acc_k") for k in stats)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_bad_dist_timeout_and_proto_chunks_are_refused(value):
    with pytest.raises(PCLError, match="--dist-timeout"):
        validate_pretrain_args(tiny_args("unused", "--dist-timeout", value))
    with pytest.raises(PCLError, match="--proto-chunks"):
        validate_pretrain_args(tiny_args("unused", "--proto-chunks", value))


def test_proto_chunks_must_divide_the_batch(tmp_path):
    with pytest.raises(PCLError, match="not divisible by --proto-chunks 5"):
        fit(tiny_args(tmp_path, "--proto-chunks", "5"))


def test_proto_chunks_run(tmp_path):
    stats = fit(tiny_args(tmp_path, "--proto-chunks", "4", "--epochs", "1", "--warmup-epoch", "0"))
    assert "loss_proto" in stats and stats["acc_proto"] >= 0


def test_gpu_check_smoke_runs_every_section(tmp_path):
    """scripts/gpu_check.sh --smoke: the prepared GPU check at toy sizes, every section measured, one JSON."""
    import json
    import math
    import subprocess

    from conftest import ROOT

    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    sections = res["sections"]
    assert list(sections) == ["tests", "throughput", "overhead", "sampling", "syncs", "fast_path", "ddp", "estep",
                              "kmeans", "kmeans_ranks", "nccl", "loader", "pil", "device_aug", "faiss"]
    assert not any("error" in r or "skipped" in r for r in sections.values())
    assert sections["tests"]["ok"] and "passed" in sections["tests"]["summary"]
    assert sections["throughput"]["images_per_s"]["fp32"] > 0 and sections["pil"]["images_per_s_per_core"] > 0
    assert sections["throughput"]["images_per_s"]["bn_splits8"] > 0
    assert sections["sampling"]["ms_per_granularity_b32"] > 0 and sections["kmeans"]["total_seconds_nredo1"] > 0
    assert set(sections["kmeans"]["peak_gpu_gb_nredo1"].values()) == {None}  # GPU memory: CUDA only
    nccl = sections["nccl"]
    assert nccl["ok"] and (nccl["two_epochs_exit"], nccl["sigterm_exit"], nccl["sigterm_resume_exit"]) == (0, 75, 0)
    assert nccl["checkpoint_saved"] and nccl["log_lines_after_resume"] > nccl["log_lines_at_stop"]
    assert sections["loader"]["ok"] and sections["loader"]["images_per_s"] > 0
    assert sections["faiss"]["ok"] and "faiss" in sections["faiss"]["status"]
    assert sections["syncs"]["ok"] and sections["syncs"]["syncs_per_step"] >= 0
    fast = sections["fast_path"]  # the real fast-path loader on the odd files; training from it
    assert fast["ok"] and fast["augment"]["training_thread_ops"] == fast["decode"]["training_thread_ops"] == 0
    assert fast["truncated_on_host"] and fast["decode"]["host_decoded"] == ["odd_truncated.JPEG"]
    assert fast["train"]["images_per_s"] > 0 and 0 <= fast["train"]["input_wait"] < 1
    assert sections["ddp"]["ok"] and sections["ddp"]["process_group"] == "gloo, world 1"
    assert sections["ddp"]["images_per_s"]["ddp"] > 0 and sections["estep"]["images_per_s"]["fp32"] > 0
    aug = sections["device_aug"]  # --augment device: worker CPU per pair vs the official pipeline's, device images/s
    for key in ("decode_ms", "official_pair_ms", "worker_pair_ms", "official_eval_ms", "worker_eval_ms",
                "device_ms_per_batch", "device_images_per_s"):
        assert math.isfinite(aug[key]) and aug[key] > 0, key
    assert aug["worker_pair_ms"] < aug["official_pair_ms"] and aug["device_output_finite"] and aug["jpegs"] > 0
    assert aug["worker_over_official"] == pytest.approx(aug["worker_pair_ms"] / aug["official_pair_ms"])
    ranks = sections["kmeans_ranks"]  # --kmeans-backend torch-ranks at world 1: timed, FLOP/s, = the torch k-means
    ks = [str(k) for k in res["sizes"]["ks"].split(",")]
    assert ranks["ok"] and ranks["process_group"] == "gloo, world 1" and ranks["n"] == res["sizes"]["kmeans_n"]
    for key in ("seconds_nredo1", "tflops_nredo1"):
        assert list(ranks[key]) == ks and all(math.isfinite(v) and v > 0 for v in ranks[key].values()), key
    assert ranks["total_seconds_nredo1"] > 0 and math.isfinite(ranks["kmeans_tflops"]) and ranks["kmeans_tflops"] > 0
    assert ranks["assignments_identical"] == dict.fromkeys(ks, True) and ranks["deterministic_check"]["identical"]
    assert set(ranks["assignments_agree_frac"].values()) == {1.0}
    assert ranks["nredo5"]["k"] == max(map(int, ks)) and ranks["nredo5"]["seconds"] > 0
    for name in sections:
        assert f"| {name} |" in proc.stdout


def test_gpu_check_writes_its_json_after_every_section_and_keeps_to_its_budget(tmp_path, monkeypatch):
    """A call cut off (the device's time limit) keeps the sections it measured; the second part adds to the
    first's file (one JSON for cost_model.py); past --budget no section starts."""
    import json
    import sys

    from conftest import ROOT

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    out, seen = tmp_path / "gpu_check.json", []
    monkeypatch.setitem(gpu_check.SECTIONS, "pil", lambda d, s, sh: {"images_per_s_per_core": 1.0, "ok": True})
    monkeypatch.setitem(gpu_check.SECTIONS, "faiss", lambda d, s, sh: seen.append(json.loads(out.read_text()))
                        or {"status": "untested", "ok": True})
    gpu_check.main(["--smoke", "--sections", "pil,faiss", "--out", str(out)])
    assert list(seen[0]["sections"]) == ["pil"]  # on disk before the next section started
    monkeypatch.setitem(gpu_check.SECTIONS, "sampling", lambda d, s, sh: {"ms_per_granularity_b32": 0.1,
                                                                          "ms_per_granularity_b256": 0.2, "ok": True})
    res = gpu_check.main(["--smoke", "--sections", "sampling,pil", "--budget", "0", "--out", str(out)])
    assert list(res["sections"]) == ["pil", "faiss", "sampling"]  # the earlier call's sections kept
    assert "skipped" in res["sections"]["sampling"] and res["sections"]["pil"]["images_per_s_per_core"] == 1.0
    assert json.loads(out.read_text())["sections"]["faiss"]["status"] == "untested"


def test_batch_larger_than_the_dataset_is_refused(tmp_path):
    """It would train 0 steps per epoch and save an untrained checkpoint with exit 0."""
    with pytest.raises(PCLError, match="--batch-size 4096 is larger than the 1438 training samples"):
        fit(tiny_args(tmp_path, "-b", "4096", "--pcl-r", "4096"))


def test_nothing_to_train_is_said_not_silent(tmp_path, tiny_run_1ep):
    with pytest.raises(PCLError, match="--start-epoch 2 is not below --epochs 2"):
        validate_pretrain_args(tiny_args(tmp_path, "--start-epoch", "2"))
    copy_run(tiny_run_1ep, tmp_path)  # fit(tiny_args(tmp_path, "--epochs", "1"))
    assert fit(tiny_args(tmp_path, "--epochs", "1", "--resume", "auto")) == {}
    assert "nothing to train" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("module", ["pcl.evaluation.knn", "pcl.evaluation.cluster_metrics"])
def test_commands_without_a_launcher_refuse_multiprocessing_distributed(module, tmp_path, capsys):
    import importlib

    from pcl.launch import main

    mod = importlib.import_module(module)
    code = main(mod.build_parser, mod.run, ["--dataset", "demo", "--multiprocessing-distributed",
                                            "--exp-dir", str(tmp_path)], one_process=f"python -m {module}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not spawn workers" in err and len(err.splitlines()) == 1


def test_eval_svm_refuses_multiprocessing_distributed(tmp_path, capsys):
    from pcl.config import build_svm_parser
    from pcl.evaluation.svm import run_svm
    from pcl.launch import main

    code = main(build_svm_parser, run_svm, ["--dataset", "demo", "--multiprocessing-distributed",
                                            "--exp-dir", str(tmp_path)], one_process="eval_svm.py")
    assert code == 2 and "eval_svm.py does not spawn workers" in capsys.readouterr().err


def test_spawned_workers_log_with_their_own_rank_before_the_group_exists(tmp_path, monkeypatch):
    """--multiprocessing-distributed: rank 3 must not log as rank 0 nor write rank 0's train.log."""
    import logging

    from pcl.log import setup_logging

    monkeypatch.delenv("RANK", raising=False)
    logger = setup_logging(str(tmp_path / "r3"), rank=3)
    assert logger.level == logging.WARNING and "[rank 3]" in logger.handlers[0].formatter._fmt
    assert len(logger.handlers) == 1 and not (tmp_path / "r3" / "train.log").exists()
    monkeypatch.setenv("RANK", "0")  # torchrun
    logger = setup_logging(str(tmp_path / "r0"), rank=None)
    assert logger.level == logging.INFO and (tmp_path / "r0" / "train.log").exists()
