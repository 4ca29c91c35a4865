"""Two gloo processes on CPU: the DDP path (shuffle-BN across ranks, exact feature gather, broadcast
cluster result, rank-0-only writes), checked against each other and against a single-process pass."""

import os
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from conftest import ROOT, free_port, run_e_step, run_epoch, tiny_args
from pcl import distributed as dist_utils
from pcl.config import validate_pretrain_args
from pcl.engine import setup
from pcl.estep import compute_features
from pcl.model import MoCo


class _Recorder:
    """Iterates a loader and records a checksum of the weights before each batch (after the last step)."""

    def __init__(self, loader, model, log):
        self.loader, self.model, self.log = loader, model, log

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.log.append(self._checksum())
            yield batch
        self.log.append(self._checksum())

    def _checksum(self):
        return torch.cat([p.detach().double().flatten() for p in self.model.parameters()])


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    args = tiny_args(os.path.join(out_dir, "exp"), "--dist-url", f"tcp://127.0.0.1:{port}", "--world-size", "2",
                     "--rank", str(rank))
    args = validate_pretrain_args(args)
    device, data, model, optimizer = setup(args)
    rec = {"state": {k: v.clone() for k, v in model.module.state_dict().items()},
           "features": compute_features(model, data.eval_loader, device, data.num_samples, False)}
    # BN statistics differ per rank, as after an epoch's last step: the E-step must use rank 0's on every rank
    if rank == 1:
        for m in model.module.encoder_k.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.add_(0.5)
                m.running_var.mul_(3.0)
    rec["state_bn"] = {k: v.clone() for k, v in model.module.state_dict().items()}
    rec["features_bn"] = compute_features(model, data.eval_loader, device, data.num_samples, False)
    rec["buffers_after"] = [b.clone() for b in model.module.encoder_k.buffers()]
    # the queue holds the keys of both ranks after one step
    im_q, im_k, _ = next(iter(data.train_loader))
    model.train()
    _, k = model.module(im_q, im_k)  # one forward outside DDP (no backward follows)
    ptr = int(model.module.queue_ptr)
    model.module.dequeue_and_enqueue(k)
    rec["k"], rec["queue_cols"] = k, model.module.queue[:, ptr:ptr + 2 * k.shape[0]].t().clone()
    rec["ptr_after"] = int(model.module.queue_ptr)
    steps = []
    cluster = run_e_step(model, data, args, device)
    rec["cluster"] = cluster.state_dict()
    run_epoch(model, _Recorder(data.train_loader, model, steps), optimizer, 1, args, device, cluster)
    rec["steps"] = steps
    torch.save(rec, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_utils.cleanup()


def test_two_gloo_processes_agree_and_match_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # identical cluster results on both ranks
    for key in ("im2cluster", "centroids", "density"):
        for a, b in zip(r0["cluster"][key], r1["cluster"][key]):
            assert torch.equal(a, b)
    # identical weights after every step
    assert len(r0["steps"]) == len(r1["steps"]) > 2
    for a, b in zip(r0["steps"], r1["steps"]):
        assert torch.equal(a, b)
    assert not torch.equal(r0["steps"][0], r0["steps"][-1])  # and training moved them
    # queue: the keys of rank 0 then rank 1, pointer advanced by the global batch
    assert torch.equal(r0["queue_cols"], torch.cat([r0["k"], r1["k"]]))
    assert torch.equal(r0["queue_cols"], r1["queue_cols"])
    assert r0["ptr_after"] == 2 * r0["k"].shape[0]
    # the gathered features equal a single-process pass with the same weights, each sample once
    args = tiny_args(tmp_path / "single")
    args = validate_pretrain_args(args)
    _, data, model, _ = setup(args)
    assert isinstance(model, MoCo)
    model.load_state_dict(r0["state"])
    single = compute_features(model, data.eval_loader, torch.device("cpu"), data.num_samples, False)
    assert torch.equal(r0["features"], r1["features"])
    assert torch.equal(r0["features"], single)  # exactly: each row computed once, by one rank
    assert (single.norm(dim=1) - 1).abs().max() < 1e-5
    # rank 1's key-encoder BN statistics differed before the second pass; both ranks used rank 0's
    assert not torch.equal(r1["state_bn"]["encoder_k.bn1.running_var"], r0["state_bn"]["encoder_k.bn1.running_var"])
    model.load_state_dict(r0["state_bn"])
    single_bn = compute_features(model, data.eval_loader, torch.device("cpu"), data.num_samples, False)
    assert torch.equal(r0["features_bn"], single_bn) and torch.equal(r1["features_bn"], single_bn)
    for a, b in zip(r0["buffers_after"], r1["buffers_after"]):
        assert torch.equal(a, b)


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / "exp"
    ckpts = sorted(p.name for p in exp.iterdir() if p.name.startswith("checkpoint_"))
    assert ckpts == ["checkpoint_0001.pth.tar", "checkpoint_last.pth.tar"], ckpts  # written once, by rank 0
    assert len((exp / "log.txt").read_text().splitlines()) == 2  # one line per epoch, not per rank
    return proc.stderr


TINY_CLI = ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "-a", "resnet18", "--width", "4",
            "--stem", "small", "--epochs", "2", "--warmup-epoch", "1", "-b", "64", "--pcl-r", "256",
            "--num-cluster", "10,20", "--kmeans-nredo", "1", "--workers", "0", "--no-progress", "--save-freq", "2"]


def test_torchrun_two_processes(tmp_path):
    err = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(free_port()), "main_pcl.py", "--dist-url", "env://", *TINY_CLI, "--exp-dir",
                str(tmp_path / "exp")], tmp_path)
    assert "2 processes" in err


def test_official_multiprocessing_distributed_form(tmp_path):
    err = _run([sys.executable, "main_pcl.py", "--dist-url", f"tcp://127.0.0.1:{free_port()}",
                "--multiprocessing-distributed", "--world-size", "1", "--rank", "0", "--nproc", "2", *TINY_CLI,
                "--exp-dir", str(tmp_path / "exp")], tmp_path)
    assert "2 processes" in err


def test_sigterm_to_the_launcher_only_reaches_the_workers(tmp_path):
    """`kill PID` of the official launcher (--multiprocessing-distributed): the workers get it, rank 0 saves,
    the launcher exits 75 naming the epoch and step it stopped at."""
    import signal
    import time

    exp = tmp_path / "exp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "main_pcl.py", "--dist-url", f"tcp://127.0.0.1:{free_port()}",
           "--multiprocessing-distributed", "--world-size", "1", "--rank", "0", "--nproc", "2", *TINY_CLI,
           "--epochs", "50", "--exp-dir", str(exp)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (exp / "log.txt").exists():  # the first epoch is done
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # the launcher only
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "forwarded to its 2 workers" in err
    line = [ln for ln in err.splitlines() if ln.startswith("preempted:")][0]
    assert "SIGTERM received: stopped after epoch" in line and "epoch -1" not in line and "--resume auto" in line
