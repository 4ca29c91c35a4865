"""The E-step's k-means on every rank (pcl.cluster.run_kmeans_across_ranks): each rank clusters with its own shard
of the features and only k x d sums, k counts and the final assignments cross the network. It must give the
single-process torch k-means's result: bit for bit with one process, and with 2 and 3 real gloo processes and an
8-rank fake group (one rank empty) the same assignments and centroids / phi within 1e-5, every rank issuing the
same collectives."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from collectives import WorldAudit
from conftest import free_port
from pcl import PCLError
from pcl.cluster import estimate_concentration, kmeans, kmeans_across_ranks, run_kmeans, run_kmeans_across_ranks

N, D, KS, TEMP = 101, 12, [4, 7], 0.2
SETTINGS = dict(seed=3, niter=8, nredo=3)


def _features(n=N, d=D, k=5, seed=0):
    """n unit rows around k centres, drawn (with repeats) from 0.3 n distinct points: clusters to find with some
    overlap, and exact duplicates, so that two initial centroids can coincide and leave one cluster empty (the
    split path runs: checked in the first test)."""
    g = torch.Generator().manual_seed(seed)
    distinct = max(int(0.3 * n), k)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    base = centres[torch.randint(k, (distinct,), generator=g)] + 0.3 * torch.randn(distinct, d, generator=g)
    return F.normalize(base, dim=1)[torch.randint(distinct, (n,), generator=g)]


def _assert_close_result(res, ref, exact=False):
    assert len(res.im2cluster) == len(ref.im2cluster) == len(res.centroids) == len(res.concentration)
    for a, b in zip(res.im2cluster, ref.im2cluster):
        assert a.dtype == torch.long and torch.equal(a, b)
    for field in ("centroids", "concentration"):
        for a, b in zip(getattr(res, field), getattr(ref, field)):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=0, atol=1e-5), field


# (a) one process


@pytest.mark.parametrize("n,ks", [(N, KS), (240, [4, 8]), (2500, [2])])  # 2500 > 1000 k: the subsampled training set
def test_one_process_equals_the_torch_backend_bit_for_bit(n, ks, monkeypatch):
    import pcl.cluster

    splits, split = [], pcl.cluster.split_empty_clusters
    monkeypatch.setattr(pcl.cluster, "split_empty_clusters", lambda *a: splits.append(split(*a)) or splits[-1])
    x = _features(n)
    ref = run_kmeans(x, ks, TEMP, backend="torch", **SETTINGS)
    res = run_kmeans_across_ranks(x, torch.arange(n), n, ks, TEMP, **SETTINGS)
    _assert_close_result(res, ref, exact=True)
    if n == N:
        assert sum(splits) > 0  # the data leave clusters empty: the split draws are part of what is compared


def test_one_process_rows_in_any_order_and_repeated():
    """Shuffled rows with a few repeated (a padded sampler): the same partition; each sample counted once."""
    x = _features()
    ref = run_kmeans(x, KS, TEMP, backend="torch", **SETTINGS)
    perm = torch.cat([torch.randperm(N, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 17, 5])])
    res = run_kmeans_across_ranks(x[perm], perm, N, KS, TEMP, **SETTINGS)
    _assert_close_result(res, ref)


def test_kmeans_across_ranks_is_the_torch_kmeans_with_one_process():
    x = _features(300)
    for k in (3, 10):
        for a, b in zip(kmeans_across_ranks(x, torch.arange(300), 300, k, 1, 10, 2), kmeans(x, k, 1, 10, 2, backend="torch")):
            assert torch.equal(a, b)


def test_stop_returns_the_granularities_done():
    x = _features()
    asked = []
    res = run_kmeans_across_ranks(x, torch.arange(N), N, KS, TEMP, niter=5, nredo=1,
                                  should_stop=lambda: asked.append(1) or len(asked) > 6)  # 1 before + 5 in k=4
    assert len(res.im2cluster) == len(res.centroids) == 1 and res.im2cluster[0].shape == (N,)
    assert torch.equal(res.im2cluster[0], run_kmeans(x, KS[:1], TEMP, backend="torch", niter=5, nredo=1).im2cluster[0])


def test_bad_input_is_refused():
    x = _features()
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(PCLError, match="NaN"):
        run_kmeans_across_ranks(bad, torch.arange(N), N, KS, TEMP)
    with pytest.raises(PCLError, match="larger than"):
        run_kmeans_across_ranks(x, torch.arange(N), N, [N + 1], TEMP)
    with pytest.raises(PCLError, match="held by no rank"):
        run_kmeans_across_ranks(x[1:], torch.arange(1, N), N, KS, TEMP)
    with pytest.raises(PCLError, match="outside"):
        run_kmeans_across_ranks(x, torch.arange(N) + 1, N, KS, TEMP)
    collapsed = F.normalize(torch.randn(8, D, generator=torch.Generator().manual_seed(0)), dim=1).repeat(30, 1)
    with pytest.raises(PCLError, match="features have collapsed"):
        run_kmeans_across_ranks(collapsed, torch.arange(240), 240, 8, TEMP, nredo=1)


def test_concentration_is_estimate_concentration_with_one_process():
    from pcl.cluster import concentration_across_ranks

    g = torch.Generator().manual_seed(0)
    dist_, assign = torch.rand(500, generator=g), torch.randint(0, 40, (500,), generator=g)
    assert torch.equal(concentration_across_ranks(dist_, assign, 40, 0.1), estimate_concentration(dist_, assign, 40, 0.1))


# (b) real gloo processes


def _shards(world):
    """Round-robin shards of N rows (rank r: r, r + W, ...), and with 3 ranks also the padded layout of
    torch's DistributedSampler (indices wrap around to fill the last round: sample 0 on two ranks)."""
    out = {"round_robin": [torch.arange(r, N, world) for r in range(world)]}
    if world == 3:
        padded = torch.cat([torch.arange(N), torch.arange(N)[: -N % world]])
        out["padded"] = [padded[r::world] for r in range(world)]
    return out


def _gloo_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = _features()
        rec = {}
        for name, shards in _shards(world).items():
            index = shards[rank]
            res = run_kmeans_across_ranks(x[index], index, N, KS, TEMP, **SETTINGS)
            rec[name] = res.state_dict()
        torch.save(rec, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_processes_give_the_single_process_result(tmp_path, world):
    from pcl.cluster import ClusterResult

    mp.spawn(_gloo_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    ref = run_kmeans(_features(), KS, TEMP, backend="torch", **SETTINGS)
    recs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in _shards(world):
        results = [ClusterResult.from_state_dict(rec[name]) for rec in recs]
        for res in results:
            _assert_close_result(res, ref)
            _assert_close_result(res, results[0], exact=True)  # every rank holds the very same result


# (c) 8 ranks on the fake process group, one of them with no rows


def test_eight_ranks_one_empty_issue_the_same_collectives_and_match():
    x = _features()
    world = 8
    shards = [torch.arange(r, N, world - 1) for r in range(world - 1)] + [torch.zeros(0, dtype=torch.long)]
    settings = dict(seed=3, niter=4, nredo=2)

    def fn(rank):
        index = shards[rank]
        rows = x[index] if index.numel() else torch.zeros(0, 0)  # an empty shard that does not know d
        return run_kmeans_across_ranks(rows, index, N, KS, TEMP, **settings)

    audit = WorldAudit(world)
    outcomes = audit.run(fn, passes=200)
    assert not audit.mismatches(), "\n".join(audit.mismatches())
    ref = run_kmeans(x, KS, TEMP, backend="torch", **settings)
    for res in outcomes:
        assert not isinstance(res, Exception), res
        _assert_close_result(res, ref)
