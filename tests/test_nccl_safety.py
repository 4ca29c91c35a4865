"""What an 8-GPU NCCL node needs of the pretraining path, checked on the CPU: no host sync per step, one error on
every rank, each rank on its own GPU, a stop seen inside k-means, distinct augmentation per rank, a start-up
rehearsal of the E-step, monitors sized for ImageNet, and the batch layout said at start."""

import sys
import time
import types

import numpy as np
import pytest
import torch

from collectives import WorldAudit
from conftest import HostSyncRecorder, run_e_step, run_epoch, tiny_args
from pcl import PCLError
from pcl.cluster import faiss_kmeans, interruptible, kmeans, run_kmeans
from pcl.config import validate_pretrain_args
from pcl.data import TensorPairLoader
from pcl.data.loaders import FileLoader, worker_seed
from pcl.data.tensor_augment import TensorAugment
from pcl.engine import fit, setup
from pcl.monitor import bank_stride, monitor_scores, pixel_side
from pcl.data import TensorEvalLoader


def _setup(tmp_path, *extra):
    cfg = validate_pretrain_args(tiny_args(tmp_path, *extra))
    return (cfg, *setup(cfg))


def test_a_training_step_makes_no_host_sync_outside_print_steps(tmp_path):
    cfg, device, data, model, optimizer = _setup(tmp_path, "--print-freq", "1000", "--epochs", "3")
    cluster = run_e_step(model, data, cfg, device)
    seen = []

    def on_step(epoch, step):  # steps 1..: step 0 is a print step (meters read, loss checked)
        seen.append(len(recorder.calls))

    with HostSyncRecorder() as recorder:
        run_epoch(model, data.train_loader, optimizer, 1, cfg, device, cluster, on_step=on_step)
    per_step = np.diff(seen)
    assert len(per_step) >= 4 and per_step.max() == 0, (per_step, recorder.calls[:20])


def test_a_non_finite_loss_is_still_stopped_before_anything_is_saved(tmp_path, monkeypatch):
    cfg, device, data, model, optimizer = _setup(tmp_path, "--print-freq", "1000")
    import pcl.loss

    real = pcl.loss.info_nce_logits
    calls = []

    def diverging(q, k, queue, t):  # the third step diverges
        calls.append(1)
        logits, labels = real(q, k, queue, t)
        return (logits * float("nan") if len(calls) == 3 else logits), labels

    monkeypatch.setattr(pcl.loss, "info_nce_logits", diverging)
    with pytest.raises(PCLError, match=r"non-finite loss at epoch 0 step 2: loss_inst=nan lr=0.05"):
        run_epoch(model, data.train_loader, optimizer, 0, cfg, device, None)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    cfg = validate_pretrain_args(tiny_args(tmp_path, "--print-freq", "2"))
    images = (torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)

    def fn(rank):
        from pcl.model import MoCo

        torch.manual_seed(0)
        model = MoCo("resnet18", 128, 256, 0.99, True, 4, "small")
        if rank == 5:  # this rank's weights diverged (its loss is NaN; DDP would spread it at the next step)
            model.encoder_q.fc[2].weight.data.fill_(float("nan"))
        optimizer = torch.optim.SGD(model.parameters(), 0.05)
        loader = TensorPairLoader(images, 2, TensorAugment(16, True, 0.2), 0)
        return run_epoch(model, loader, optimizer, 0, cfg, torch.device("cpu"), None)

    audit = WorldAudit(8)
    outcomes = audit.run(fn)
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    assert all(isinstance(o, PCLError) for o in outcomes), outcomes
    assert "non-finite loss at epoch 0 step 0: loss_inst=nan" in str(outcomes[5])
    assert "on another rank by epoch 0 step 0" in str(outcomes[0])


class _FakeFaiss(types.ModuleType):
    """Records which GPU faiss is asked to use; refuses the all-GPU sharding."""

    def __init__(self, gpus):
        super().__init__("faiss")
        self.gpus, self.devices = gpus, []

    def get_num_gpus(self):
        return self.gpus

    def index_cpu_to_all_gpus(self, *args, **kwargs):
        raise AssertionError("k-means sharded over every visible GPU (the other ranks' too)")

    def Clustering(self, d, k):  # noqa: N802 (faiss's names)
        clus = types.SimpleNamespace(d=d, k=k)
        clus.train = lambda x, index: setattr(clus, "centroids", x[:k].reshape(-1).copy())
        return clus

    def StandardGpuResources(self):  # noqa: N802
        return object()

    def GpuIndexFlatConfig(self):  # noqa: N802
        return types.SimpleNamespace(device=None, useFloat16=True)

    def GpuIndexFlatL2(self, res, d, cfg):  # noqa: N802
        self.devices.append(cfg.device)
        return types.SimpleNamespace(search=lambda x, n: (np.zeros((len(x), 1), "float32"),
                                                          np.zeros((len(x), 1), "int64")))

    def vector_to_array(self, a):
        return a


def test_faiss_k_means_uses_the_calling_ranks_gpu_only(monkeypatch):
    fake = _FakeFaiss(gpus=8)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    x = np.random.default_rng(0).standard_normal((100, 4)).astype("float32")
    faiss_kmeans(x, 5, seed=0, niter=2, nredo=1, gpu_device=3)  # rank 3 of a node, on cuda:3
    assert fake.devices == [3]


def test_torch_k_means_looks_for_a_stop_between_lloyd_iterations():
    x = torch.nn.functional.normalize(torch.randn(500, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    asked = []
    assert kmeans(x, 10, 0, niter=20, nredo=5, backend="torch",
                  should_stop=lambda: asked.append(1) or len(asked) >= 3) is None
    assert len(asked) == 3  # stopped in the first run's third iteration, not after 100
    result = run_kmeans(x, [10, 20], 0.2, backend="torch", nredo=1, should_stop=lambda: len(asked) >= 3)
    assert result.im2cluster == []


def test_work_that_cannot_look_for_a_stop_is_abandoned_promptly_on_one():
    start = time.perf_counter()
    stop_at = start + 0.3
    assert interruptible(lambda: time.sleep(5) or "done", lambda: time.perf_counter() > stop_at, 0.05) is None
    assert time.perf_counter() - start < 2
    assert interruptible(lambda: "done", lambda: False) == "done"
    with pytest.raises(ValueError, match="inner"):
        interruptible(lambda: (_ for _ in ()).throw(ValueError("inner")), lambda: False)


class _SameImage(torch.utils.data.Dataset):
    """Every index is the same picture: two ranks can then differ only by their augmentation draws."""

    def __init__(self, n=16):
        from PIL import Image

        from pcl.data import pretrain_transform

        self.n, self.transform = n, pretrain_transform(True, 16)
        grid = np.add.outer(np.arange(32), np.arange(32)).astype("uint8") * 4
        self.image = Image.fromarray(np.stack([grid, grid.T, 255 - grid], axis=2))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(self.image), i


def test_loader_workers_of_two_ranks_draw_different_augmentations(monkeypatch):
    import pcl.distributed as dist_utils

    batches = {}
    for rank in (0, 1):
        monkeypatch.setattr(dist_utils, "rank", lambda: rank)
        monkeypatch.setattr(dist_utils, "world_size", lambda: 2)
        loader = FileLoader(_SameImage(), 4, workers=1, seed=0, train=True)
        batches[rank] = next(iter(loader))[0]
    assert not torch.equal(batches[0], batches[1])
    assert worker_seed(0, 3, 0) == 3 and worker_seed(0, 3, 1) != worker_seed(0, 4, 0)  # rank 0: as before


def test_a_broken_k_means_backend_stops_the_run_at_start_up_not_at_the_first_e_step(tmp_path, monkeypatch):
    import pcl.cluster

    def broken(*args, **kwargs):
        raise RuntimeError("faiss: CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(pcl.cluster, "kmeans", broken)
    with pytest.raises(RuntimeError, match="no kernel image"):
        fit(tiny_args(tmp_path / "exp", "--epochs", "3", "--warmup-epoch", "2"))
    assert not (tmp_path / "exp" / "log.txt").exists()  # not one epoch was trained first


def test_the_start_up_log_says_the_global_batch_and_the_rehearsal(tiny_run):
    text = (tiny_run / "train.log").read_text()  # fit(tiny_args(exp)): 2 epochs
    assert "global batch 64, 64 per process" in text
    assert "E-step start-up check: 1 ranks, k-means" in text and "ok in" in text


def test_the_knn_monitor_budget_at_imagenet_scale():
    assert bank_stride(1_281_167, 2048, 8 << 30) == 3  # 21 GB in transit -> every 3rd image
    assert bank_stride(50_000, 2048, 8 << 30) == 1
    side = pixel_side(1_281_167, 224, 8 << 30)
    assert 2 * 4 * 1_281_167 * 3 * side ** 2 <= 8 << 30 < 2 * 4 * 1_281_167 * 3 * (side + 1) ** 2


def test_a_bank_over_budget_is_cut_with_a_log_line_and_still_scored(pcl_lines):
    bank = (torch.rand(60, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels = torch.arange(60) % 3
    knn = (TensorEvalLoader(bank, 7), labels, TensorEvalLoader(bank[:20], 7), labels[:20])
    scores = monitor_scores(None, knn, torch.device("cpu"), k=3, budget_bytes=60 * 3 * 16 * 8, image_size=8)
    assert any("raw pixels average-pooled to 4 x 4 px" in r for r in pcl_lines) and 0 <= scores["knn_top1"] <= 100


def _script_timeouts(path):
    import re

    text = open(path).read()
    shutdown = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
    signals = re.search(r"PET_SIGNALS_TO_HANDLE:-([A-Z0-9,]+)", text).group(1).split(",")
    return text, shutdown, signals


def test_the_torchrun_scripts_give_the_workers_time_to_save_and_pass_sigusr1():
    import re

    from conftest import ROOT

    text, shutdown, signals = _script_timeouts(f"{ROOT}/scripts/pretrain_slurm.sbatch")
    lead = int(re.search(r"#SBATCH --signal=\w+@(\d+)", text).group(1))
    assert 30 < shutdown < lead  # torchrun's default 30 s loses a save in progress; past the lead SLURM kills
    assert {"SIGTERM", "SIGUSR1"} <= set(signals)
    _, shutdown, signals = _script_timeouts(f"{ROOT}/scripts/pretrain_multinode_torchrun.sh")
    assert shutdown > 30 and {"SIGTERM", "SIGUSR1"} <= set(signals)


def test_sigusr1_to_torchrun_reaches_the_workers_and_they_save(tmp_path):
    """scripts/pretrain_multinode_torchrun.sh on one node with 2 CPU processes: SIGUSR1 (SLURM's --signal=USR1)
    to torchrun alone; without TORCHELASTIC_SIGNALS_TO_HANDLE torchrun dies of it and its workers save nothing."""
    import os
    import signal
    import socket
    import subprocess

    from conftest import ROOT, image_folder

    data, exp = image_folder(tmp_path / "data", ["a", "b"], per_class=16, size=20), tmp_path / "exp"
    (tmp_path / "cfg.yaml").write_text("mlp: true\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", GPUS_PER_NODE="2", PORT=str(port), CONFIG=str(tmp_path / "cfg.yaml"))
    for key in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        env.pop(key, None)
    cmd = [f"{ROOT}/scripts/pretrain_multinode_torchrun.sh", data, str(exp), "1", "0", "127.0.0.1",
           "--image-size", "16", "-a", "resnet18", "--width", "4", "--stem", "small", "--epochs", "500",
           "--warmup-epoch", "1", "-b", "8", "--pcl-r", "16", "--num-cluster", "3,4", "--kmeans-nredo", "1",
           "--workers", "0", "--no-progress", "--cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (exp / "log.txt").exists():
            time.sleep(0.5)
        assert (exp / "log.txt").exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no epoch"
        proc.send_signal(signal.SIGUSR1)  # torchrun only (exec'd by the script)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (exp / "PREEMPTED").exists(), err[-3000:]
    assert "SIGUSR1 received: stopped after epoch" in (exp / "PREEMPTED").read_text()


def test_the_bank_stride_shares_no_factor_with_the_ranks():
    from pcl.monitor import coprime_stride

    assert [coprime_stride(s, 8) for s in (1, 2, 3, 4, 8)] == [1, 3, 3, 5, 9]
    assert coprime_stride(4, 6) == 5 and coprime_stride(2, 1) == 2


def test_a_stop_during_the_knn_monitor_returns_nothing_on_every_rank():
    bank = (torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    knn = (TensorEvalLoader(bank, 7), torch.arange(40) % 2, TensorEvalLoader(bank, 7), torch.arange(40) % 2)
    assert monitor_scores(None, knn, torch.device("cpu"), k=3, should_stop=lambda: True) == {}


def test_a_rank_with_an_empty_shard_goes_through_the_same_gather():
    from pcl import distributed as dist_utils

    x = torch.arange(10.0).view(5, 2)

    def fn(rank):  # 5 samples on 8 ranks: ranks 5-7 hold none and do not know d
        mine = torch.arange(5)[rank::8]
        return dist_utils.gather_rows_exact(x[mine] if len(mine) else torch.zeros(0, 0), mine, 5, dst=0)

    audit = WorldAudit(8)
    outcomes = audit.run(fn)
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    assert torch.equal(outcomes[0], x) and outcomes[1:] == [None] * 7


def test_an_unexpected_error_on_rank_0_keeps_its_type_there_and_is_named_elsewhere():
    from pcl import distributed as dist_utils

    def fn(rank):
        def boom():
            raise MemoryError("CUDA out of memory")
        return dist_utils.main_only(boom, "the kNN monitor")

    outcomes = WorldAudit(8).run(fn)
    assert isinstance(outcomes[0], MemoryError)
    assert all(type(o) is RuntimeError and "the kNN monitor failed on rank 0: MemoryError" in str(o)
               for o in outcomes[1:])


def test_a_stop_during_the_monitor_saves_the_epoch_before_logging_it(tmp_path, monkeypatch):
    import os
    import signal

    import pcl.monitor
    from pcl import Preempted
    from pcl.checkpoint import load_checkpoint

    real = pcl.monitor.monitor_scores

    def signalled(*args, **kwargs):  # SLURM's signal arrives while the monitor encodes the bank
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(pcl.monitor, "monitor_scores", signalled)
    exp = tmp_path / "exp"
    with pytest.raises(Preempted) as stopped:
        fit(tiny_args(exp, "--epochs", "3", "--warmup-epoch", "3", "--knn-every", "1", "--save-freq", "5"))
    assert stopped.value.epoch == 1 and stopped.value.step == 0
    assert load_checkpoint(exp / "checkpoint_0000.pth.tar")["epoch"] == 1
    assert len((exp / "log.txt").read_text().splitlines()) == 1


def test_a_stopped_process_with_abandoned_k_means_exits_75_at_once(tmp_path):
    """faiss abandoned in its thread: the process leaves with os._exit(75), not through a CUDA teardown."""
    import subprocess

    from conftest import ROOT

    code = f"""
import atexit, sys, time
sys.path.insert(0, {ROOT!r})
from pcl import Preempted
from pcl.cluster import interruptible
from pcl.launch import run_cli
atexit.register(lambda: print("teardown ran"))
def run(args):
    assert interruptible(lambda: time.sleep(30), lambda: True, 0.01) is None
    raise Preempted("ckpt", 1, 2, "SIGTERM")
import argparse
sys.exit(run_cli(lambda: argparse.ArgumentParser(), run, []))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 75 and "preempted:" in out.stderr and "teardown ran" not in out.stdout, out
