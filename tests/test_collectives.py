"""An 8-rank job simulated one rank after another on torch's fake process group (tests/collectives.py): every rank
must issue the same collectives, with the same shapes and dtypes, on its own device, whatever its shard size, and
stop, fail or finish together. On NCCL a rank whose sequence differs waits in its collective until --dist-timeout.

The same audits run on the accelerator (``cuda``-marked, scripts/gpu_check.sh): CUDA tensors in every collective.
"""

import pytest
import torch

from collectives import WorldAudit
from conftest import tiny_args
from pcl import PCLError
from pcl import distributed as dist_utils
from pcl.config import validate_pretrain_args
from pcl.data import PretrainData, TensorEvalLoader
from pcl.estep import e_step, self_check
from pcl.settings import EStepSettings
from pcl.monitor import monitor_scores
from pcl.model import MoCo
from pcl.preemption import StopRequest, Stopped

N = 81  # with 8 ranks and eval batches of 5: rank 0's shard has 11 images (3 batches), the others 10 (2)


def _images(n=N, seed=0):
    return (torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def _cfg(tmp_path, *extra):
    return validate_pretrain_args(tiny_args(tmp_path, "--num-cluster", "4,8", "--low-dim", "16", *extra))


def _model(device):
    torch.manual_seed(0)
    return MoCo("resnet18", 16, 64, 0.99, True, 4, "small").to(device)


def _e_step(cfg, device, stop=None, rank_hook=None):
    def fn(rank):
        model = _model(device)
        data = PretrainData(None, TensorEvalLoader(_images(), 5), N)
        if rank_hook is not None:
            rank_hook(rank)
        try:
            return e_step(model, data.eval_loader, N, EStepSettings.of(cfg), device,
                          stop(rank) if stop else None).clusters.to("cpu")
        except Stopped:  # raised on every rank alike
            return None
    return fn


def _audit_e_step(tmp_path, device):
    cfg = _cfg(tmp_path)
    audit = WorldAudit(8)
    outcomes = audit.run(_e_step(cfg, device, stop=lambda rank: StopRequest()))
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    assert audit.devices() == {device.type}  # every tensor a collective sees is on the rank's device
    single = e_step(_model(device), TensorEvalLoader(_images(), 5), N, EStepSettings.of(cfg), device).clusters.to("cpu")
    for result in outcomes:  # rank 0 clustered the rows every rank sent; every rank got its result
        for a, b in zip(result.im2cluster, single.im2cluster):
            assert torch.equal(a, b)
        for a, b in zip(result.concentration, single.concentration):
            assert torch.allclose(a, b)
    names = [name for name, _ in audit.sequence(0)]
    assert "all_gather_into_tensor" not in names and names.count("gather") == 2  # N x C on rank 0 only


def test_e_step_issues_the_same_collectives_on_every_rank_with_unequal_shards(tmp_path):
    _audit_e_step(tmp_path, torch.device("cpu"))


@pytest.mark.cuda
def test_e_step_collectives_on_the_accelerator(tmp_path, accel):
    _audit_e_step(tmp_path, accel)


def test_a_stop_on_one_rank_during_the_e_step_stops_every_rank_at_the_same_batch(tmp_path):
    def stop(rank):
        request = StopRequest()
        if rank == 3:
            request.signal_name = "SIGTERM"  # only rank 3 was signalled (e.g. by SLURM, one node)
        return request

    audit = WorldAudit(8)
    outcomes = audit.run(_e_step(_cfg(tmp_path), torch.device("cpu"), stop=stop))
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    assert outcomes == [None] * 8
    assert [name for name, _ in audit.sequence(0)].count("all_reduce") == 2  # the agreed max, then batch 1's check


def test_an_error_in_rank_0s_k_means_is_raised_on_every_rank(tmp_path, monkeypatch):
    """Collapsed features (or a broken faiss) fail k-means on rank 0; the others must not wait for its result."""
    import pcl.estep

    def broken(*args, **kwargs):
        raise PCLError("k=4: 4 prototypes get a zero concentration (collapsed features)")

    def rank_hook(rank):
        monkeypatch.setattr(pcl.estep, "run_kmeans", broken if rank == 0 else pcl.cluster.run_kmeans)

    import pcl.cluster

    audit = WorldAudit(8)
    outcomes = audit.run(_e_step(_cfg(tmp_path), torch.device("cpu"), rank_hook=rank_hook))
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    assert all(isinstance(o, PCLError) and "collapsed features" in str(o) for o in outcomes), outcomes


def test_a_failed_save_on_rank_0_stops_every_rank_with_its_message():
    def fn(rank):
        def save():
            raise PCLError("could not save checkpoint x: No space left on device")
        return dist_utils.main_only(save, "saving x")

    audit = WorldAudit(8)
    outcomes = audit.run(fn)
    assert not audit.mismatches()
    assert all(isinstance(o, PCLError) and "No space left" in str(o) for o in outcomes)


def test_the_knn_monitor_gathers_to_rank_0_and_every_rank_gets_its_scores():
    bank, test = _images(N, 1), _images(37, 2)
    bank_labels, test_labels = torch.arange(N) % 3, torch.arange(37) % 3

    def fn(rank):
        knn = (TensorEvalLoader(bank, 5), bank_labels, TensorEvalLoader(test, 5), test_labels)
        return monitor_scores(None, knn, torch.device("cpu"), k=5, image_size=8)

    audit = WorldAudit(8)
    outcomes = audit.run(fn)
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    single = monitor_scores(None, (TensorEvalLoader(bank, 5), bank_labels, TensorEvalLoader(test, 5), test_labels),
                            torch.device("cpu"), k=5, image_size=8)
    assert outcomes == [single] * 8
    names = [name for name, _ in audit.sequence(0)]
    assert "all_gather_into_tensor" not in names and "broadcast_object_list" in names


def test_the_start_up_check_agrees_over_ranks_and_fails_everywhere_with_a_broken_backend(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    audit = WorldAudit(8)
    outcomes = audit.run(lambda rank: self_check(EStepSettings.of(cfg), torch.device("cpu"), 16))
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    assert all(isinstance(o, float) for o in outcomes), outcomes

    import pcl.cluster

    def broken_kmeans(*args, **kwargs):
        raise RuntimeError("faiss: CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(pcl.cluster, "kmeans", broken_kmeans)
    outcomes = WorldAudit(8).run(lambda rank: self_check(EStepSettings.of(cfg), torch.device("cpu"), 16))
    assert all(isinstance(o, RuntimeError) and "no kernel image" in str(o) for o in outcomes), outcomes
