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


def test_prototypes_that_differ_on_one_rank_are_refused_naming_it():
    """torch-ranks needs the same random draws on every GPU; a rank whose draws differ holds other centroids or
    phi while the all-gathered assignments agree: every rank refuses, naming the ranks that differ."""
    from pcl import PCLError
    from pcl.cluster import ClusterResult, check_same_on_ranks

    g = torch.Generator().manual_seed(0)
    base = ClusterResult([torch.randint(4, (N,), generator=g), torch.randint(8, (N,), generator=g)],
                         [torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g)],
                         [torch.rand(4, generator=g), torch.rand(8, generator=g)])

    def on_rank(rank, centroid_ranks=(), phi_ranks=()):
        res = ClusterResult([a.clone() for a in base.im2cluster], [c.clone() for c in base.centroids],
                            [p.clone() for p in base.concentration])
        if rank in centroid_ranks:  # one float32 step off in one coordinate
            res.centroids[1][5, 3] = torch.nextafter(res.centroids[1][5, 3], torch.tensor(9.0))
        if rank in phi_ranks:
            res.concentration[0][2] *= 1.5
        return check_same_on_ranks(res, "the E-step at epoch 7")

    assert WorldAudit(4).run(on_rank) == [None] * 4
    for outcome in WorldAudit(4).run(lambda rank: on_rank(rank, centroid_ranks=(2,))):
        assert isinstance(outcome, PCLError), outcome
        assert str(outcome).startswith("the E-step at epoch 7: rank(s) 2 hold other prototypes (centroids) than rank 0")
        assert "--kmeans-backend torch " in str(outcome) and "\n" not in str(outcome)
    for outcome in WorldAudit(4).run(lambda rank: on_rank(rank, (3,), (1, 3))):
        assert "rank(s) 1, 3 hold other prototypes (centroids and phi)" in str(outcome), outcome


def test_the_start_up_check_and_every_e_step_compare_the_prototypes_over_ranks(tmp_path, monkeypatch):
    """The start-up rehearsal compared only the assignments (all-gathered: equal whatever the centroids)."""
    import pcl.estep as estep
    from pcl import PCLError

    real = estep.run_kmeans_across_ranks

    def drifted(*a, **k):  # rank 1's draws differ: one centroid one float32 step off
        result = real(*a, **k)
        if estep.dist_utils.rank() == 1:
            result.centroids[0][1, 3] = torch.nextafter(result.centroids[0][1, 3], torch.tensor(2.0))
        return result

    monkeypatch.setattr(estep, "run_kmeans_across_ranks", drifted)
    outcomes = WorldAudit(2).run(lambda rank: self_check(_settings(tmp_path, "torch-ranks"), torch.device("cpu"), 16),
                                 passes=100)
    for o in outcomes:
        assert isinstance(o, PCLError) and str(o).startswith("start-up check of the E-step: rank(s) 1 "), o
    checked = []
    monkeypatch.setattr(estep, "check_same_on_ranks", lambda result, when: checked.append((result, when)))
    for backend in ("torch-ranks", "torch"):
        out = e_step(_model(), TensorEvalLoader(_images(), 5), N, _settings(tmp_path, backend), torch.device("cpu"),
                     epoch=7)
        assert checked[-1] == (out.clusters, "the E-step at epoch 7")


def test_the_fingerprint_sees_every_bit_and_every_position():
    from pcl.cluster import _fingerprint

    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    base = _fingerprint(x)
    assert torch.equal(base, _fingerprint(x.clone())) and base.dtype == torch.int64
    bits = x.view(torch.int32)
    for i, j, b in [(0, 0, 0), (17, 3, 15), (49, 6, 16), (30, 2, 31)]:
        y = bits.clone()
        y[i, j] ^= 1 << b if b < 31 else -(2 ** 31)
        assert not torch.equal(_fingerprint(y.view(torch.float32)), base), (i, j, b)
    assert not torch.equal(_fingerprint(x[torch.randperm(50)]), base)  # the same values elsewhere
    assert not torch.equal(_fingerprint(torch.tensor([3, 1, 2])), _fingerprint(torch.tensor([1, 2, 3])))
