"""pcl.estep with --kmeans-backend torch-ranks: every rank clusters its own features, sums all-reduced; the result
is the rank-0 torch backend's, bit for bit with one process, and the same on every simulated rank of eight."""

from dataclasses import replace

import torch

from collectives import WorldAudit
from conftest import tiny_args
from pcl.config import validate_pretrain_args
from pcl.data import TensorEvalLoader
from pcl.engine import fit
from pcl.estep import e_step, self_check
from pcl.model import MoCo
from pcl.settings import EStepSettings

N = 81  # 8 ranks, batches of 5: unequal shards


def _images():
    return (torch.rand(N, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


def _settings(tmp_path, backend):
    cfg = validate_pretrain_args(tiny_args(tmp_path, "--num-cluster", "4,8", "--low-dim", "16",
                                           "--kmeans-backend", backend))
    return replace(EStepSettings.of(cfg), progress=False)


def _model():
    torch.manual_seed(0)
    return MoCo("resnet18", 16, 64, 0.99, True, 4, "small")


def _same(a, b, exact=True):
    for x, y in zip(a.im2cluster, b.im2cluster):
        assert torch.equal(x, y)
    for x, y in zip(a.centroids + a.concentration, b.centroids + b.concentration):
        assert torch.equal(x, y) if exact else torch.allclose(x, y, atol=1e-5)


def test_torch_ranks_in_one_process_is_the_torch_backend_bit_for_bit(tmp_path):
    loader, cpu = TensorEvalLoader(_images(), 5), torch.device("cpu")
    ranks = e_step(_model(), loader, N, _settings(tmp_path, "torch-ranks"), cpu)
    rank0 = e_step(_model(), loader, N, _settings(tmp_path, "torch"), cpu)
    _same(ranks.clusters, rank0.clusters)
    assert torch.equal(ranks.features, rank0.features)  # kept for the galleries (--prototype-gallery is on)
    assert len(ranks.kmeans_seconds) == 2


def test_torch_ranks_on_eight_ranks_issues_the_same_collectives_and_gathers_no_features(tmp_path):
    settings = replace(_settings(tmp_path, "torch-ranks"), keep_features=False)
    single = e_step(_model(), TensorEvalLoader(_images(), 5), N, settings, torch.device("cpu")).clusters
    audit = WorldAudit(8)
    outcomes = audit.run(lambda rank: e_step(_model(), TensorEvalLoader(_images(), 5), N, settings,
                                             torch.device("cpu")).clusters, passes=100)  # one pass per exchange
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    for result in outcomes:
        _same(result, single, exact=False)
    names = [name for name, _ in audit.sequence(0)]
    assert "gather" not in names  # no N x d gather: only the assignments travel


def test_start_up_check_rehearses_the_ranks_backend(tmp_path):
    outcomes = WorldAudit(4).run(lambda rank: self_check(_settings(tmp_path, "torch-ranks"), torch.device("cpu"), 16),
                                 passes=100)
    assert all(isinstance(o, float) for o in outcomes), outcomes


def test_a_run_with_torch_ranks_equals_one_with_torch(tmp_path):
    one = ("--epochs", "1", "--warmup-epoch", "0")  # one epoch, its E-step first: the backends are all that differ
    a = fit(tiny_args(tmp_path / "a", "--kmeans-backend", "torch-ranks", *one))
    b = fit(tiny_args(tmp_path / "b", "--kmeans-backend", "torch", *one))
    assert "loss_proto" in a and "nmi_k10" in a  # the E-step ran and its prototypes trained
    drop = ("seconds", "input_wait")
    assert {k: v for k, v in a.items() if not any(d in k for d in drop)} == \
        {k: v for k, v in b.items() if not any(d in k for d in drop)}


def test_kmeans_reseed_draws_a_recorded_seed_per_e_step_and_the_default_is_official(tmp_path):
    official = _settings(tmp_path, "torch")
    assert official.kmeans_seed(0) == official.kmeans_seed(7) == 0  # seed g for granularity g, every epoch
    reseeded = replace(official, reseed=True)
    seeds = {reseeded.kmeans_seed(epoch) for epoch in range(20)}
    assert len(seeds) == 20 and reseeded.kmeans_seed(3) == replace(official, reseed=True).kmeans_seed(3)
    loader, cpu = TensorEvalLoader(_images(), 5), torch.device("cpu")
    a = e_step(_model(), loader, N, reseeded, cpu, epoch=1)
    b = e_step(_model(), loader, N, reseeded, cpu, epoch=2)
    assert a.seed == reseeded.kmeans_seed(1) != b.seed
    stats = fit(tiny_args(tmp_path / "r", "--kmeans-reseed", "--kmeans-backend", "torch"))
    assert stats["kmeans_seed"] == reseeded.kmeans_seed(1)  # logged with its epoch (the last, epoch 1)
    log = (tmp_path / "r" / "train.log").read_text().splitlines()
    assert sum("] E-step epoch" in line for line in log) == 1  # one line per E-step (one E-step: epoch 1)
    assert not any("k-means k=" in line or "k-means backend" in line for line in log)  # those are debug


def test_proto_weight_one_is_the_official_loss_and_zero_drops_the_term(tmp_path):
    from pcl.engine import build_loss

    cfg = validate_pretrain_args(tiny_args(tmp_path))
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=1)
    k = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(16, 256, generator=gen), dim=0)
    clusters = e_step(_model(), TensorEvalLoader(_images(), 5), N, _settings(tmp_path, "torch"), torch.device("cpu")).clusters
    index = torch.arange(8)
    one = build_loss(cfg)(q, k, queue, index, clusters, torch.Generator().manual_seed(1))
    assert torch.equal(one.total, one.inst + one.proto)
    zero = build_loss(cfg.replace(proto_weight=0.0))(q, k, queue, index, clusters, torch.Generator().manual_seed(1))
    assert torch.equal(zero.total, zero.inst) and torch.equal(zero.proto, one.proto)  # still logged
