import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcl import PCLError
from pcl.cluster import estimate_concentration, run_kmeans


def official_phi(distances, assign, k, temperature, alpha=10.0):
    """The official loop (main_pcl.run_kmeans), in float64, as the reference."""
    buckets = [[] for _ in range(k)]
    for d, a in zip(distances, assign):
        buckets[a].append(d)
    phi = np.zeros(k)
    for i, ds in enumerate(buckets):
        if len(ds) > 1:
            phi[i] = np.asarray(ds, dtype=np.float64).mean() / np.log(len(ds) + alpha)
    dmax = phi.max()
    for i, ds in enumerate(buckets):
        if len(ds) <= 1:
            phi[i] = dmax
    phi = phi.clip(np.percentile(phi, 10), np.percentile(phi, 90))
    return temperature * phi / phi.mean()


@pytest.mark.parametrize("skewed", [False, True])
def test_concentration_matches_official_loop(skewed):
    rng = np.random.default_rng(0)
    n, k = 3000, 400
    if skewed:  # power-law sizes: many empty clusters and singletons
        assign = np.minimum((rng.pareto(1.0, n) * 5).astype(np.int64), k - 1)
    else:
        assign = rng.integers(0, k, n)
    dist = rng.random(n).astype(np.float32) * 2
    counts = np.bincount(assign, minlength=k)
    if skewed:
        assert (counts == 0).any() and (counts == 1).any()
    phi = estimate_concentration(dist, assign, k, 0.2)
    ref = official_phi(dist.astype(np.float64), assign, k, 0.2)
    assert phi.shape == (k,) and phi.dtype == torch.float32
    np.testing.assert_allclose(phi.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert phi.double().mean().item() == pytest.approx(0.2, rel=1e-5)


def test_concentration_tensor_inputs_and_singleton_rule():
    dist = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0])
    assign = torch.tensor([0, 0, 1, 1, 2])  # cluster 2 is a singleton, cluster 3 empty
    phi = estimate_concentration(dist, assign, 4, 0.1)
    raw = np.array([2 / np.log(12), 2 / np.log(12), 0, 0])
    raw[2:] = raw.max()
    np.testing.assert_allclose(phi.numpy(), 0.1 * raw / raw.mean(), rtol=1e-6)


def test_concentration_all_singletons_is_finite():
    phi = estimate_concentration(torch.rand(5), torch.arange(5), 5, 0.2)
    assert torch.isfinite(phi).all()
    assert torch.allclose(phi, torch.full((5,), 0.2))


def _blobs(n_per=60, k=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, d, generator=g), dim=1) * 3
    x = torch.cat([c + 0.05 * torch.randn(n_per, d, generator=g) for c in centers])
    return F.normalize(x, dim=1), torch.arange(k).repeat_interleave(n_per)


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_recovers_blobs(backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="faiss is the [cpu] / [gpu] extra")
    x, truth = _blobs()
    res = run_kmeans(x, [4, 8], 0.2, backend=backend, nredo=20)  # random init, as faiss: restarts find the blobs
    assert _same_partition(res.im2cluster[0], truth)
    for assign, cent, phi, k in zip(res.im2cluster, res.centroids, res.concentration, [4, 8]):
        assert assign.shape == (240,) and assign.dtype == torch.long
        assert cent.shape == (k, 16)
        assert torch.allclose(cent.norm(dim=1), torch.ones(k), atol=1e-5)
        assert phi.shape == (k,) and phi.mean().item() == pytest.approx(0.2, rel=1e-4)
        # each sample is assigned to its nearest (normalised) centroid
        assert torch.equal((x @ cent.t()).argmax(1), assign)


def test_torch_kmeans_matches_faiss_on_easy_data():
    pytest.importorskip("faiss", reason="faiss is the [cpu] / [gpu] extra")
    x, _ = _blobs(k=6, seed=3)
    a = run_kmeans(x, 6, 0.2, backend="faiss", nredo=20).im2cluster[0]
    b = run_kmeans(x, 6, 0.2, backend="torch", nredo=20).im2cluster[0]
    assert _same_partition(a, b)


def test_kmeans_refuses_nan_and_too_many_clusters():
    x, _ = _blobs()
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(PCLError, match="NaN"):
        run_kmeans(bad, 4, 0.2)
    with pytest.raises(PCLError, match="larger than"):
        run_kmeans(x, 1000, 0.2)


def test_collapsed_features_give_a_clear_message_not_nan():
    """Clusters whose members coincide exactly (what a diverged run produces) get phi = 0 (ProtoNCE would divide
    by it): refused with the cause and the fix. (faiss leaves ~1e-14 residuals here, so the torch backend.)"""
    points = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    x = points.repeat_interleave(30, dim=0)  # 8 distinct points x 30 copies
    with pytest.raises(PCLError, match="features have collapsed"):
        run_kmeans(x, 8, 0.2, nredo=1, backend="torch")


def test_auto_backend_keeps_kmeans_on_the_features_gpu(monkeypatch):
    """faiss-cpu on a GPU node must not pull an ImageNet E-step onto the host: auto picks, in order, faiss-GPU,
    the torch k-means on the features' CUDA device, faiss-CPU, the torch k-means on the CPU."""
    import sys
    import types

    import pcl.cluster as cl

    def faiss(installed, gpus=0):  # what `import faiss` finds: a build that sees `gpus` GPUs, or none at all
        monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(get_num_gpus=lambda: gpus)
                            if installed else None)

    cases = [((True, 2), "cuda:1", "faiss"), ((True, 0), "cuda:1", "torch"), ((False, 0), "cuda", "torch"),
             ((True, 0), "cpu", "faiss"), ((False, 0), "cpu", "torch")]
    for status, device, expected in cases:
        faiss(*status)
        backend, why = cl.resolve_backend("auto", device)
        assert backend == expected, (status, device, why)
        assert why.startswith("auto:")
    faiss(True, 0)
    assert "torch k-means on cuda:1" in cl.resolve_backend("auto", "cuda:1")[1]
    assert cl.resolve_backend("torch", "cpu")[0] == "torch"
    faiss(False)
    with pytest.raises(PCLError, match="faiss is not installed"):
        cl.resolve_backend("faiss", "cpu")


def test_empty_cluster_split_matches_faiss_semantics():
    """Donor drawn by size - 1 (a singleton never), symmetric per-dimension perturbation, even split of counts."""
    from pcl.cluster import SPLIT_EPS, split_empty_clusters

    c = torch.tensor([[9.0, 9.0, 9.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    counts = torch.tensor([0, 6, 1])  # cluster 0 empty; 2 is a singleton: only 1 can donate
    donor = c[1].clone()
    assert split_empty_clusters(c, counts, torch.Generator().manual_seed(0)) == 1
    sign = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    assert torch.equal(c[0], donor * (1 + SPLIT_EPS * sign))  # even dims up, odd dims down
    assert torch.equal(c[1], donor * (1 - SPLIT_EPS * sign))
    assert counts.tolist() == [3, 3, 1]  # the donor's members assumed split evenly
    # the two copies point in different directions (a pure rescaling would not separate unit-norm data)
    assert F.cosine_similarity(c[0], c[1], dim=0) < 1 - 1e-7
    # several empty clusters: split one after the other, each seeing the sizes the previous splits left
    counts = torch.tensor([0, 6, 1, 0])
    split_empty_clusters(torch.ones(4, 3, dtype=torch.float64), counts, torch.Generator().manual_seed(0))
    assert counts.sum() == 7 and counts[2] == 1 and (counts[[0, 1, 3]] >= 1).all()
    # donor frequencies follow size - 1: sizes 2 and 11 -> weights 1 and 10
    picks = torch.zeros(3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2000):
        cc = torch.eye(3, dtype=torch.float64)
        cnt = torch.tensor([0, 2, 11])
        split_empty_clusters(cc, cnt, gen)
        picks[1 if cnt[1] == 1 else 2] += 1
    assert abs(picks[2] / 2000 - 10 / 11) < 0.03
    # nothing to split: every cluster has at most one member
    cnt = torch.tensor([0, 1, 1])
    assert split_empty_clusters(torch.eye(3), cnt, gen) == 1 and cnt.tolist() == [0, 1, 1]


def _sequential_split(c, counts, gen):
    """The empty-cluster split one cluster after the other (faiss's loop, with its draw by size - 1): the
    reference the batched split_empty_clusters keeps bit for bit when at most one cluster is empty."""
    from pcl.cluster import SPLIT_EPS

    empty = (counts == 0).nonzero().flatten().tolist()
    sign = torch.ones(c.shape[1], dtype=c.dtype)
    sign[1::2] = -1
    for ci in empty:
        weight = (counts - 1).clamp_min(0).to(torch.float64)
        if float(weight.sum()) <= 0:
            break
        cj = int(torch.multinomial(weight, 1, generator=gen))
        c[ci] = c[cj] * (1 + SPLIT_EPS * sign)
        c[cj] = c[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


def test_empty_cluster_split_is_the_sequential_one_with_one_empty_cluster():
    from pcl.cluster import split_empty_clusters

    g = torch.Generator().manual_seed(0)
    cases = []
    for trial in range(40):
        k = int(torch.randint(3, 60, (1,), generator=g))
        counts = torch.randint(1, 30, (k,), generator=g)
        if trial % 4:  # one empty cluster (else none)
            counts[int(torch.randint(k, (1,), generator=g))] = 0
        dtype = (torch.float32, torch.float64)[trial % 2]
        cases.append((torch.randn(k, 5, generator=g, dtype=dtype), counts if trial % 3 else counts.double()))
    cases.append((torch.eye(3), torch.tensor([0, 1, 1])))  # nothing to split: every cluster has <= 1 member
    for seed, (c, counts) in enumerate(cases):
        ca, na, ga = c.clone(), counts.clone(), torch.Generator().manual_seed(seed)
        cb, nb, gb = c.clone(), counts.clone(), torch.Generator().manual_seed(seed)
        assert split_empty_clusters(ca, na, ga) == _sequential_split(cb, nb, gb)
        assert torch.equal(ca, cb) and torch.equal(na, nb), seed
        assert torch.equal(ga.get_state(), gb.get_state())  # the same draws: later ones line up too


def test_many_empty_clusters_are_split_in_a_few_batched_rounds(monkeypatch):
    """200 empty clusters: a few multinomial draws (rounds), not one per cluster; sizes kept, none left empty,
    every new centroid its donor's perturbed copy, and a collapsed cluster split again and again."""
    import pcl.cluster as cl

    draws = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: draws.append(a[1]) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    counts = torch.cat([torch.zeros(200, dtype=torch.long), torch.randint(20, 40, (800,), generator=g)])
    c = torch.randn(1000, 8, generator=g, dtype=torch.float64)
    before, n_before = c.clone(), counts.clone()
    assert cl.split_empty_clusters(c, counts, g) == 200
    assert len(draws) <= 4 and draws[0] == 200, draws  # the sequential loop: 200 draws, 400 host syncs
    assert counts.sum() == n_before.sum() and (counts > 0).all()
    for i in range(200):  # an original centroid scaled per dimension by (1 +- eps) once or twice: even / odd alike
        ratio = c[i] / before[200:][(c[i] / before[200:]).std(1).argmin()]
        assert (ratio - 1).abs().max() < 2.1 * cl.SPLIT_EPS and ratio[0::2].std() < 1e-12 and ratio[1::2].std() < 1e-12
    collapsed = torch.tensor([0] * 15 + [64])  # every sample in one cluster
    cl.split_empty_clusters(torch.randn(16, 4, generator=g), collapsed, g)
    assert collapsed.sum() == 64 and (collapsed >= 1).all()


def test_reduced_precision_assignments_agree_with_fp32_and_faiss_refuses_them():
    from pcl.cluster import kmeans

    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=1)
    x = torch.nn.functional.normalize(centres[torch.arange(600) % 6] + 0.05 * torch.randn(600, 16, generator=gen),
                                      dim=1)
    c32, d32, a32 = kmeans(x, 6, seed=0, niter=10, nredo=2, backend="torch")
    c, d, a = kmeans(x, 6, seed=0, niter=10, nredo=2, backend="torch", precision="tf32")
    assert torch.equal(a, a32) and torch.equal(c, c32)  # TF32 changes nothing off CUDA
    c, d, a = kmeans(x, 6, seed=0, niter=10, nredo=2, backend="torch", precision="bf16")
    assert (a == a32).float().mean() > 0.95 and abs(float(d.sum() / d32.sum()) - 1) < 0.01  # d: fp32 final pass
    with pytest.raises(PCLError, match="--kmeans-precision fp16: use one of fp32, tf32, bf16"):
        kmeans(x, 6, backend="torch", precision="fp16")
    pytest.importorskip("faiss")
    with pytest.raises(PCLError, match="--kmeans-precision bf16 applies to the PyTorch k-means"):
        kmeans(x, 6, backend="faiss", precision="bf16")


def test_bf16_scores_are_summed_and_kept_in_float32():
    """--kmeans-precision bf16 rounds the inputs only: the assignment is the float64 argmax over bf16-rounded rows
    and centroids (a bf16 score, 2^-8 apart near 1, tied neighbouring centroids: 2.8 % of these rows moved)."""
    from pcl.cluster import _nearest, _strict_fp32

    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(20, 64, generator=g), dim=1)
    x = F.normalize(centres[torch.arange(2000) % 20] + 0.1 * torch.randn(2000, 64, generator=g), dim=1)
    c = F.normalize(x[torch.randperm(2000, generator=g)[:400]] + 0.02 * torch.randn(400, 64, generator=g), dim=1)
    want = (x.bfloat16().double() @ c.bfloat16().double().t() - 0.5 * (c.double() ** 2).sum(1)).argmax(1)
    with _strict_fp32():
        _, got = _nearest(x, c, precision="bf16")
    assert torch.equal(got, want)


def test_nmi_on_the_device_is_scikit_learns_in_float64():
    from sklearn.metrics import normalized_mutual_info_score

    from pcl.features import nmi

    gen = np.random.default_rng(0)
    for n, ka, kb in [(1000, 5, 7), (400, 50, 3), (300, 300, 2), (500, 1, 4)]:
        a, b = gen.integers(0, ka, n), gen.integers(0, kb, n)
        b[: n // 2] = a[: n // 2] % kb  # some shared structure
        want = normalized_mutual_info_score(a, b) * 100
        assert abs(nmi(torch.from_numpy(a), torch.from_numpy(b)) - want) < 1e-9, (n, ka, kb)
    a = torch.tensor([3, 3, 7, 7, 9])
    assert nmi(a, 10 - a) == 100.0 and nmi(torch.zeros(5), torch.zeros(5)) == 100.0


def test_a_faiss_whose_library_fails_to_load_counts_as_absent(monkeypatch):
    """NH05: an OSError from the import (a missing .so) was a traceback; auto now takes the torch k-means."""
    import builtins

    from pcl.cluster import resolve_backend

    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "faiss":
            raise OSError("libfaiss.so: cannot open shared object file: No such file or directory")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    backend, why = resolve_backend("auto", "cpu")
    assert backend == "torch" and "faiss is installed but cannot be loaded (libfaiss.so: cannot open" in why
    with pytest.raises(PCLError, match=r"--kmeans-backend faiss: faiss is installed but cannot be loaded"):
        resolve_backend("faiss", "cpu")
