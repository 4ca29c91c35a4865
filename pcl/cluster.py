"""E-step: k-means at several granularities and the per-prototype concentration phi (PCL Eq. 12).

Backends behind one interface (:func:`run_kmeans`): faiss (GPU index when faiss has GPU support and the
features live on CUDA, CPU index otherwise) with the official settings, and a pure-PyTorch Lloyd k-means
(chunked distances) for machines whose faiss-gpu will not install.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pcl import ABANDONED_THREAD, PCLError
from pcl.distributed import all_gather_cat, all_reduce_sum, gather_rows_exact, is_dist, rank, world_size

logger = logging.getLogger(__name__)


@dataclass
class ClusterResult:
    """One entry per granularity. im2cluster: LongTensor[N]; centroids: k x d (unit rows); concentration: k."""

    im2cluster: list[torch.Tensor] = field(default_factory=list)
    centroids: list[torch.Tensor] = field(default_factory=list)
    concentration: list[torch.Tensor] = field(default_factory=list)
    kmeans_seconds: list[float] = field(default_factory=list)  # per granularity, where it was computed (not saved)
    objective: list[float] = field(default_factory=list)  # per granularity: mean squared distance (not saved)

    def to(self, device: torch.device | str) -> "ClusterResult":
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return ClusterResult(move(self.im2cluster), move(self.centroids), move(self.concentration),
                             list(self.kmeans_seconds), list(self.objective))

    def state_dict(self) -> dict:
        return {"im2cluster": [t.cpu() for t in self.im2cluster], "centroids": [t.cpu() for t in self.centroids],
                "density": [t.cpu() for t in self.concentration]}  # 'density': the official name of phi

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClusterResult":
        return cls(list(state["im2cluster"]), list(state["centroids"]), list(state["density"]))


def estimate_concentration(
    distances: np.ndarray | torch.Tensor,
    im2cluster: np.ndarray | torch.Tensor,
    num_clusters: int,
    temperature: float,
    alpha: float = 10.0,
) -> torch.Tensor:
    """Concentration phi of each prototype, vectorised (the official code loops over samples in Python).

    distances: N, Euclidean (not squared) distance of each sample to its centroid; im2cluster: N.
    For a cluster with Z >= 2 members: phi = mean(distance) / log(Z + alpha). Clusters with Z <= 1 take the
    largest phi of the others. phi is then clipped to its [10th, 90th] percentiles (linear interpolation,
    numpy's default) and rescaled so that mean(phi) = temperature. Returns float32 tensor[num_clusters].
    """
    d = torch.as_tensor(distances).reshape(-1).to(torch.float64)
    assign = torch.as_tensor(im2cluster).reshape(-1).to(device=d.device, dtype=torch.long)
    counts = torch.bincount(assign, minlength=num_clusters)[:num_clusters].to(torch.float64)  # k
    sums = torch.zeros(num_clusters, dtype=torch.float64, device=d.device).index_add_(0, assign, d)  # k
    return concentration_from_sums(sums, counts, temperature, alpha)


def concentration_from_sums(sums: torch.Tensor, counts: torch.Tensor, temperature: float,
                            alpha: float = 10.0) -> torch.Tensor:
    """phi from each cluster's sum of member distances and member count (both float64 tensor[k]): the part of
    :func:`estimate_concentration` that needs no sample, shared with :func:`concentration_across_ranks`, whose
    ranks all-reduce these two k-vectors instead of gathering N distances. Returns float32 tensor[k]."""
    multi = counts > 1
    phi = torch.zeros_like(sums)  # k, float64
    phi[multi] = sums[multi] / counts[multi] / torch.log(counts[multi] + alpha)
    phi_max = phi.max()
    phi[~multi] = phi_max
    if phi_max <= 0:  # no cluster with two distinct members: all equal concentration
        phi = torch.ones_like(phi)
    lo, hi = torch.quantile(phi, torch.tensor([0.1, 0.9], dtype=torch.float64, device=phi.device))
    phi = phi.clamp(lo, hi)
    phi = temperature * phi / phi.mean()
    return phi.to(torch.float32)


def check_features(features: torch.Tensor, num_clusters: Sequence[int]) -> None:
    """Refuse NaN/inf features and more clusters than samples, with a message that says what to do."""
    if not torch.isfinite(features).all():
        bad = int((~torch.isfinite(features).all(dim=1)).sum())
        raise PCLError(f"k-means input has {bad} rows with NaN/inf features: the encoder diverged "
                       f"(lower --lr, or try --amp none); refusing to cluster garbage")
    n = features.shape[0]
    if max(num_clusters) > n:
        raise PCLError(f"--num-cluster {','.join(map(str, num_clusters))}: k={max(num_clusters)} is larger than "
                       f"the {n} training samples; choose every k <= {n}")


def faiss_kmeans(x: np.ndarray, k: int, seed: int, niter: int, nredo: int, gpu_device: int | None,
                 init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Official settings; returns (centroids k x d, squared distances N, assignments N). The flat L2 index lives
    on ``gpu_device`` alone, the calling process's own GPU, as the official code's ``GpuIndexFlatL2`` (an index
    sharded over every visible GPU would, on a node with one process per GPU, use the other ranks' GPUs too,
    which fails where GPUs are in exclusive-process mode); None: on the CPU. ``init`` (k x d): start from these
    centroids instead of k random rows (a warm start: one run, ``nredo`` is ignored)."""
    import faiss

    d = x.shape[1]
    clus = faiss.Clustering(d, k)
    clus.verbose = False
    clus.niter = niter
    clus.nredo = nredo if init is None else 1
    clus.seed = seed
    clus.max_points_per_centroid = 1000
    clus.min_points_per_centroid = 1  # only gates faiss's stderr warning (official 10): the start-up check advises on k
    if gpu_device is not None:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        cfg.device = gpu_device
        index = faiss.GpuIndexFlatL2(res, d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
    if init is not None:  # faiss starts from the centroids it already holds
        faiss.copy_array_to_vector(np.ascontiguousarray(init, dtype=np.float32).ravel(), clus.centroids)
    clus.train(x, index)  # leaves the best centroids in the index
    dist2, assign = index.search(x, 1)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return centroids, dist2[:, 0], assign[:, 0]


def interruptible(fn: Callable[[], Any], should_stop: Callable[[], bool] | None, poll_seconds: float = 0.5) -> Any:
    """``fn()``, or None as soon as ``should_stop()`` says so while it runs (asked every ``poll_seconds``).

    For work that cannot look for a stop itself (faiss trains all its Lloyd iterations in one call, ~75 s at
    k = 100k on a GPU, longer than the 30 s torchrun grants after SIGTERM): it runs in a daemon thread (faiss
    releases the GIL) and is abandoned on a stop, renamed ``pcl.ABANDONED_THREAD``: the process then exits
    without tearing CUDA down under it (:func:`pcl.launch.exit_now`)."""
    if should_stop is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["err"] = e

    worker = threading.Thread(target=target, name="pcl-kmeans", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll_seconds)
        if worker.is_alive() and should_stop():
            worker.name = ABANDONED_THREAD
            return None
    if "err" in box:
        raise box["err"]
    return box["out"]


PRECISIONS = ("fp32", "tf32", "bf16")  # --kmeans-precision: the Lloyd iterations' assignment step


def _bf16_scores(xs: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
    """xs @ ct with xs (float32) rounded to bfloat16 like ct (bfloat16), the products summed and returned in
    float32: chunk x k. Not a bfloat16 result: near 1 its 8-bit mantissa steps by 2^-7, more than the scores of
    neighbouring centroids differ at large k, which rounded them together (30 % of assignments moved at k = 1000).
    On CUDA one GEMM with float32 output (torch.mm's out_dtype); elsewhere the same numbers from float32 copies
    (no speed-up there)."""
    a = xs.to(torch.bfloat16)
    if a.is_cuda:
        try:
            return torch.mm(a, ct, out_dtype=torch.float32)
        except TypeError:  # a torch without mm's out_dtype
            pass
    return a.float() @ ct.float()


@torch.no_grad()
def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 4096, precision: str = "fp32"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distance to, and index of, the nearest centroid. x: N x d; c: k x d -> (N, N).
    ``precision``: the score matmul in fp32 (as faiss), TF32 (CUDA tensor cores; fp32 elsewhere) or bf16 inputs
    with fp32 accumulation and output (:func:`_bf16_scores`); the distances returned are then approximate too."""
    half_norm = -0.5 * (c * c).sum(dim=1)  # k
    best_d = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    best_i = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    ct = c.t().to(torch.bfloat16) if precision == "bf16" else c.t()
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        if precision == "bf16":
            score = _bf16_scores(xs, ct) + half_norm  # bf16 inputs, fp32 sums and scores
        elif precision == "tf32":
            with _matmul_precision("high"):
                score = torch.addmm(half_norm, xs, ct)
        else:
            score = torch.addmm(half_norm, xs, ct)  # x.c - |c|^2/2 : chunk x k (argmax = nearest)
        val, idx = score.max(dim=1)
        best_d[s:s + chunk] = ((xs * xs).sum(dim=1) - 2 * val).clamp_min(0)
        best_i[s:s + chunk] = idx
    return best_d, best_i


SPLIT_EPS = 1.0 / 1024  # faiss's relative perturbation of a split centroid (Clustering.cpp, EPS)


@torch.no_grad()
def split_empty_clusters(c: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
    """Refill empty clusters as faiss's ``split_clusters`` does, in place; returns the number of empty clusters.

    c: k x d centroids, counts: k cluster sizes (float or int, updated). Each empty cluster gets a donor drawn
    with probability proportional to (size - 1) -- a singleton is never split --, a copy of the donor's centroid,
    and the two are pushed apart per dimension: even dimensions x (1 + eps) for the new one and x (1 - eps) for
    the donor, odd dimensions the other way round (a change of direction, not only of norm); the donor's members
    are then assumed split evenly. When every cluster has <= 1 member nothing is split (faiss would loop forever).

    In rounds, not one cluster after the other: in a round every still-empty cluster draws its donor at once
    (with replacement) from the sizes at the round's start; a donor drawn by several serves the first of them
    (the lowest cluster index), and the others draw again in the next round from the sizes its split left (its
    halved size, the new cluster's). So a large cluster is still split again and again, as in faiss's sequential
    loop, and one round costs a few kernels and three host syncs whatever the number of empty clusters (the
    loop cost two syncs and ~10 kernels per cluster: thousands per Lloyd iteration at k = 100k early on). With
    one empty cluster the draw and the result are the sequential loop's, bit for bit; with more, the draws of
    one round do not see each other's splits (the probabilities differ by O(splits / N)), so the donors are
    not those the sequential loop draws from the same generator. faiss draws donors by a cyclic scan with
    acceptance probability (size - 1) / (n - k), whose stationary choice is the same proportion.
    """
    remaining = (counts == 0).nonzero().flatten()  # the empty clusters, ascending; one sync
    total = remaining.numel()
    sign = torch.ones(c.shape[1], dtype=c.dtype, device=c.device)
    sign[1::2] = -1  # even dims +, odd dims -
    while remaining.numel():
        weight = (counts - 1).clamp_min(0).to(torch.float64)  # k
        if float(weight.sum()) <= 0:
            break  # every cluster has <= 1 member: nothing to split
        many = remaining.numel() > 1  # one: the sequential loop's very draw
        donors = torch.multinomial(weight, remaining.numel(), replacement=many, generator=gen)  # m
        first = _first_occurrences(donors) if many else torch.ones_like(donors, dtype=torch.bool)
        served = first.nonzero().flatten()  # one donor each (distinct): one sync
        ci, cj = remaining[served], donors[served]
        c[ci] = c[cj] * (1 + SPLIT_EPS * sign)
        c[cj] = c[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
        remaining = remaining[(~first).nonzero().flatten()]  # one sync
    return total


@torch.no_grad()
def _torch_kmeans(x: torch.Tensor, k: int, seed: int, niter: int, nredo: int,
                  should_stop: Callable[[], bool] | None = None, precision: str = "fp32",
                  init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Lloyd k-means with faiss's semantics: random init from (a subsample of at most 1000 k) points,
    niter iterations, empty clusters refilled by :func:`split_empty_clusters`, the best of nredo runs by
    objective. Not bit-equal to faiss (its RNG), equal in distribution (measured: benchmarks/bench_kmeans.py).
    ``should_stop`` is asked after every Lloyd iteration: True -> None.

    This process alone (no collective even inside a process group): the one-rank case of
    :func:`kmeans_across_ranks`, whose code it shares, with the rows in dataset order."""
    n = x.shape[0]
    index = torch.arange(n, device=x.device)
    return _lloyd(x, index, n, k, seed, niter, nredo, should_stop, across_ranks=False, precision=precision,
                  init=init)


@contextlib.contextmanager
def _matmul_precision(level: str) -> Iterator[None]:
    """torch's float32 matmul precision set to ``level`` inside ("highest": no TF32 / bf16 passes, as faiss
    computes its distances; "high": TF32 on CUDA), the caller's setting restored after."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _strict_fp32() -> contextlib.AbstractContextManager:
    return _matmul_precision("highest")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.no_grad()
def _lloyd(x: torch.Tensor, index: torch.Tensor, num_samples: int, k: int, seed: int, niter: int, nredo: int,
           should_stop: Callable[[], bool] | None, across_ranks: bool, precision: str = "fp32",
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The Lloyd k-means of :func:`_torch_kmeans` and :func:`kmeans_across_ranks`, on this rank's rows.

    x: n_r x d float32, the rows this rank holds; index: n_r, their dataset indices (every index in
    [0, num_samples) held by exactly one rank). Every random draw (the subsample, each run's k initial rows,
    the donors of empty clusters) comes from one generator seeded with ``seed`` and is made alike on every
    rank, from global quantities only (N, k, the all-reduced counts), so the ranks agree without exchanging
    draws. Per iteration each rank assigns its own rows; the per-centroid sums (k x d) and counts (k) are
    summed over ranks (``across_ranks``; identities otherwise), so every rank computes the same centroids.
    With one rank holding every row in dataset order the operations are those of a single-process k-means,
    in the same order: the same bits. Collectives per run, the same on every rank whatever its n_r: one
    all-reduce for the initial centroids, two per iteration, one for the objective.
    Returns (centroids k x d, squared distances n_r, assignments n_r) of this rank's rows, or None on a stop.
    ``precision`` (:data:`PRECISIONS`) applies to the iterations' assignment step only; the objective that picks
    the best run, the final assignments and the distances phi is computed from stay in fp32.
    ``init`` (k x d, the same on every rank): one run from these centroids instead of ``nredo`` runs from random
    rows (a warm start); every other draw (the subsample, the split donors) as in a cold run.
    """
    if precision not in PRECISIONS:
        raise PCLError(f"--kmeans-precision {precision}: use one of {', '.join(PRECISIONS)}")
    with _strict_fp32():
        return _lloyd_runs(x, index, num_samples, k, seed, niter, nredo, should_stop,
                           all_reduce_sum if across_ranks else _identity, precision, init)


def _lloyd_runs(x: torch.Tensor, index: torch.Tensor, num_samples: int, k: int, seed: int, niter: int, nredo: int,
                should_stop: Callable[[], bool] | None, reduce: Callable[[torch.Tensor], torch.Tensor],
                precision: str = "fp32", init: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The body of :func:`_lloyd`; ``reduce``: the in-place sum over ranks, or the identity."""
    device, d = x.device, x.shape[1]
    gen = torch.Generator(device=device).manual_seed(seed)
    train, num_train = x, num_samples
    sample: torch.Tensor | None = None  # the subsample's dataset indices, in draw order
    if num_samples > 1000 * k:  # faiss's max_points_per_centroid: train on 1000 k rows drawn without replacement
        num_train = 1000 * k
        sample = torch.randperm(num_samples, generator=gen, device=device)[:num_train]  # num_train
        rank_in_sample = torch.full((num_samples,), num_train, dtype=torch.long, device=device)  # N
        rank_in_sample[sample] = torch.arange(num_train, device=device)
        pos = rank_in_sample[index]  # n_r: where each local row stands in the subsample (num_train: not drawn)
        picked = (pos < num_train).nonzero().flatten()
        train = x[picked[pos[picked].argsort()]]  # this rank's part of the subsample, in draw order
    local_row = torch.full((num_samples,), -1, dtype=torch.long, device=device)  # N: dataset index -> local row
    local_row[index] = torch.arange(index.shape[0], device=device)
    best_obj, best_c = math.inf, None
    for _ in range(nredo if init is None else 1):
        if init is None:
            first = torch.randperm(num_train, generator=gen, device=device)[:k]  # k positions in the training set
            chosen = first if sample is None else sample[first]  # k distinct dataset indices
            rows = local_row[chosen]  # k: the local row of each, -1 where another rank holds it
            held = rows >= 0
            c = torch.zeros(k, d, dtype=x.dtype, device=device)
            c[held] = x[rows[held]]
            c = reduce(c)  # k x d: each row filled by the one rank holding it
        else:
            c = init.to(device=device, dtype=x.dtype).clone()  # k x d, the same on every rank
        for _ in range(niter):
            _, assign = _nearest(train, c, precision=precision)
            counts = reduce(torch.bincount(assign, minlength=k))  # k
            sums = reduce(torch.zeros_like(c).index_add_(0, assign, train))  # k x d
            nonempty = counts > 0
            c[nonempty] = sums[nonempty] / counts[nonempty, None].to(c.dtype)
            split_empty_clusters(c, counts, gen)  # counts are global: the same draws on every rank
            if should_stop is not None and should_stop():
                return None
        local_obj = _nearest(train, c)[0].sum()  # a float32 sum, as the single-process k-means takes it
        obj = float(reduce(local_obj.to(torch.float64).reshape(1)))
        if obj < best_obj:
            best_obj, best_c = obj, c
    dist2, assign = _nearest(x, best_c)
    return best_c, dist2, assign


def _faiss_problem() -> str | None:
    """Why faiss cannot be used (None: it imports): not installed, or installed but its library fails to load (a
    missing shared object or CUDA runtime raises OSError, not ImportError)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "faiss is not installed"
    except OSError as e:
        return f"faiss is installed but cannot be loaded ({str(e).strip().splitlines()[0][:160]})"
    return None


def _faiss_status() -> tuple[bool, int]:
    """(faiss importable, number of GPUs its build can use)."""
    if _faiss_problem() is not None:
        return False, 0
    import faiss

    try:
        return True, int(getattr(faiss, "get_num_gpus", lambda: 0)())
    except Exception:  # a faiss-gpu build on a machine whose driver it cannot use
        return True, 0


def _faiss_gpu_device(features: torch.Tensor) -> int | None:
    if features.device.type != "cuda" or _faiss_status()[1] == 0:
        return None  # faiss-cpu (only with an explicit --kmeans-backend faiss): cluster on the host
    return features.device.index or 0


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """(backend, why) for features on ``device``. ``auto`` picks, in order: faiss on the GPU when the features
    are on CUDA and faiss has GPU support; else the torch k-means on the features' CUDA device (faiss-cpu
    would cluster on the host: hours per ImageNet E-step while the other ranks wait); else faiss on the CPU;
    else the torch k-means on the CPU."""
    if backend not in ("auto", "faiss", "torch"):
        raise PCLError(f"unknown k-means backend '{backend}': use auto, faiss or torch")
    device = torch.device(device)
    if backend == "torch":
        return "torch", f"--kmeans-backend torch (on {device})"  # no faiss import: it may be what is broken
    has_faiss, gpus = _faiss_status()
    if backend == "faiss":
        if not has_faiss:
            raise PCLError(f"--kmeans-backend faiss: {_faiss_problem()} (pip install faiss-cpu, or "
                           "pip install -e \".[gpu]\" for faiss on the GPU; --kmeans-backend torch needs none)")
        where = "GPU" if device.type == "cuda" and gpus else "CPU"
        return "faiss", f"--kmeans-backend faiss (faiss on the {where})"
    if device.type == "cuda":
        if has_faiss and gpus:
            return "faiss", f"auto: features on {device} and faiss has GPU support ({gpus} GPUs)"
        reason = "faiss has no GPU support (faiss-cpu)" if has_faiss else _faiss_problem()
        return "torch", f"auto: features on {device} and {reason}: the torch k-means on {device}"
    if has_faiss:
        return "faiss", "auto: features on the CPU, faiss installed"
    return "torch", f"auto: features on the CPU, {_faiss_problem()}: the torch k-means"


def kmeans(x: torch.Tensor, k: int, seed: int = 0, niter: int = 20, nredo: int = 5, backend: str = "auto",
           should_stop: Callable[[], bool] | None = None, precision: str = "fp32", init: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One k-means on x: N x d with the resolved backend: (centroids k x d, squared distances N, assignments N),
    on the device of x (unnormalised centroids; no concentration). On CUDA it uses x's GPU only. None when
    ``should_stop()`` said so (asked between Lloyd iterations, or every half second while faiss runs).
    ``init`` (k x d): a warm start from these centroids (one run) instead of ``nredo`` random starts."""
    backend = resolve_backend(backend, x.device)[0]
    if backend == "faiss" and precision != "fp32":
        raise PCLError(f"--kmeans-precision {precision} applies to the PyTorch k-means: faiss computes in fp32 "
                       "(use --kmeans-backend torch or torch-ranks, or --kmeans-precision fp32)")
    if backend == "faiss":
        host = x.detach().float().cpu().numpy()
        start = None if init is None else init.detach().float().cpu().numpy()
        out = interruptible(lambda: faiss_kmeans(host, k, seed, niter, nredo, _faiss_gpu_device(x), start),
                            should_stop)
        return None if out is None else tuple(torch.from_numpy(a).to(x.device) for a in out)
    return _torch_kmeans(x.detach().float(), k, seed, niter, nredo, should_stop, precision, init)


def run_kmeans(
    features: torch.Tensor | np.ndarray,
    num_clusters: int | Sequence[int],
    temperature: float,
    *,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 5,
    backend: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    precision: str = "fp32",
    init: Sequence[torch.Tensor | None] | None = None,
) -> ClusterResult:
    """k-means at each granularity (seed + granularity index, as official), then phi.

    features: N x d (the momentum features; the official code uses unit rows). Returns a ClusterResult on
    the device of ``features`` with L2-normalised centroids and each granularity's objective (mean squared
    distance to the assigned centroid). ``should_stop`` is asked before each granularity and during each (see
    :func:`kmeans`); when it says yes the result holds only the granularities done so far. ``init``: per
    granularity, k x d centroids to start from (a warm start, one run) or None (``nredo`` random starts).
    """
    ks = [num_clusters] if isinstance(num_clusters, int) else list(num_clusters)
    x = torch.as_tensor(features).detach().float().contiguous()
    check_features(x, ks)
    backend, why = resolve_backend(backend, x.device)
    logger.debug("k-means backend: %s (%s)", backend, why)
    result = ClusterResult()
    for g, k in enumerate(ks):
        if should_stop is not None and should_stop():
            logger.warning("k-means stopped before k=%d: a stop was requested", k)
            break
        start = time.perf_counter()
        out = kmeans(x, k, seed + g, niter, nredo, backend, should_stop, precision, _initial(init, g, k, x.shape[1]))
        if out is None:
            logger.warning("k-means stopped during k=%d: a stop was requested", k)
            break
        c, dist2, assign = out
        seconds = time.perf_counter() - start
        phi = estimate_concentration(dist2.clamp_min(0).sqrt(), assign, k, temperature)
        degenerate = int((~torch.isfinite(phi) | (phi <= 0)).sum())
        if degenerate:  # ProtoNCE divides by phi: stop here with the cause instead of a NaN loss later
            raise PCLError(f"k={k}: {degenerate} prototypes get a zero or undefined concentration because their "
                           f"samples coincide (mean distance to the centroids {float(dist2.clamp_min(0).sqrt().mean()):.2e}): "
                           f"the features have collapsed (or the data holds many exact duplicates); lower --lr or "
                           f"the extra loss weights (--pauc-*) and resume from an earlier checkpoint")
        result.im2cluster.append(assign.long())
        result.centroids.append(torch.nn.functional.normalize(c.float(), dim=1))
        result.concentration.append(phi.to(x.device))
        result.kmeans_seconds.append(seconds)
        result.objective.append(float(dist2.clamp_min(0).to(torch.float64).sum()) / x.shape[0])
        logger.debug("k-means k=%d (%s): %.2f s", k, backend, seconds)
    return result


@torch.no_grad()
def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two int64 numbers that change when any bit of ``t`` does (float32 values, or integers below 2^31): the
    low and high 16 bits of each value, weighted by position and summed exactly (below 2^56 for up to 2^24
    values), so the result does not depend on the order a device sums in."""
    bits = (t.float().contiguous().view(torch.int32) if t.is_floating_point() else t.to(torch.int32)).reshape(-1)
    bits = bits.to(torch.int64)
    pos = torch.arange(bits.numel(), device=bits.device)
    low, high = bits & 0xFFFF, (bits >> 16) & 0xFFFF
    return torch.stack([(low * (pos % 65521 + 1)).sum(), (high * ((pos * 7919) % 65519 + 1)).sum()])


@torch.no_grad()
def check_same_on_ranks(result: ClusterResult, when: str) -> None:
    """Refuse prototypes that are not bit for bit the same on every rank: one all-gather of a fingerprint
    (:func:`_fingerprint`, 2 int64) of each granularity's centroids, concentration and assignments. The torch
    k-means on every rank (``torch-ranks``) gets the same centroids only from the same random draws on every
    GPU; on mixed GPUs (or drivers) they can differ while the all-gathered assignments are equal everywhere.
    Call it on every rank alike (``when``: the E-step it checks, for the message); nothing with one process."""
    if not is_dist():
        return
    parts = [t for ts in (result.centroids, result.concentration, result.im2cluster) for t in ts]
    mine = torch.cat([_fingerprint(t) for t in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    device = parts[0].device if parts else torch.device("cpu")
    every = all_gather_cat(mine.to(device)[None])  # W x 2P
    differ = (every != every[0]).any(dim=1).nonzero().flatten().tolist()
    if differ:
        num = len(result.centroids)
        what = sorted({("centroids", "phi", "assignments")[j // 2 // max(num, 1)]
                       for j in (every != every[0]).any(dim=0).nonzero().flatten().tolist()})
        raise PCLError(f"{when}: rank(s) {', '.join(map(str, differ))} hold other prototypes ({' and '.join(what)}) "
                       f"than rank 0 of {world_size()}; with --kmeans-backend torch-ranks every GPU must make the same "
                       f"random draws (the same GPU model and driver on every rank): use --kmeans-backend torch "
                       f"(rank 0 clusters and broadcasts) on mixed GPUs")


def _initial(init: Sequence[torch.Tensor | None] | None, g: int, k: int, d: int) -> torch.Tensor | None:
    """Granularity ``g``'s starting centroids from ``init`` (None: a cold start); a shape other than k x d is an
    error (the caller passes the previous E-step's centroids only when the granularities are the same)."""
    if init is None or init[g] is None:
        return None
    if tuple(init[g].shape) != (k, d):
        raise PCLError(f"k-means warm start for k={k}: the previous centroids are {tuple(init[g].shape)}, "
                       f"expected ({k}, {d})")
    return init[g]


# The E-step's k-means on every rank: each rank keeps its own shard of the features, and only k x d sums, k
# counts and the final assignments cross the network (instead of N x d features gathered to rank 0).


def _all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks; identity with one process."""
    if is_dist():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor


@torch.no_grad()
def _first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """bool n: True at the first position of each distinct value of ``index`` (n), in the given order."""
    order = index.argsort(stable=True)  # n
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    out = torch.empty_like(first)
    out[order] = first
    return out


@torch.no_grad()
def _shard_plan(x: torch.Tensor, index: torch.Tensor, num_samples: int, ks: Sequence[int]) -> tuple[torch.Tensor, int]:
    """(owned: bool n_r, d) for this rank's rows, agreed by one all-reduce of N + 3 int32 on every rank.

    ``owned`` marks the rows this rank counts: each dataset index is counted once over all ranks, by the
    lowest rank holding it (a padded sampler repeats a few samples on other ranks; counted twice, they would
    pull the centroids and phi toward them), and once within a rank. The same all-reduce carries the feature
    dimension (an empty shard does not know it) and the refusals of :func:`check_features`, so that bad input
    is refused on every rank alike instead of on one while the others wait in their next collective."""
    world, me, n = world_size(), rank(), index.shape[0]
    head = torch.zeros(num_samples + 3, dtype=torch.int32, device=x.device)  # N + 3
    valid = (index >= 0) & (index < num_samples)
    head[index[valid]] = world - me  # the maximum over ranks names the lowest rank holding the index
    head[num_samples] = x.shape[1] if n else 0
    head[num_samples + 1] = int((~torch.isfinite(x).all(dim=1)).sum()) if n else 0
    head[num_samples + 2] = int(not bool(valid.all()) or x.shape[0] != n)
    _all_reduce_max_(head)
    if int(head[num_samples + 2]):
        raise PCLError(f"k-means across ranks: a rank passed dataset indices outside [0, {num_samples}) or a "
                       f"different number of indices than feature rows")
    if int(head[num_samples + 1]):
        raise PCLError(f"k-means input has up to {int(head[num_samples + 1])} rows per rank with NaN/inf features: "
                       f"the encoder diverged (lower --lr, or try --amp none); refusing to cluster garbage")
    missing = int((head[:num_samples] == 0).sum())
    if missing:
        raise PCLError(f"k-means across ranks: {missing} of the {num_samples} samples are held by no rank (the "
                       f"shards must cover every dataset index)")
    if max(ks) > num_samples:
        raise PCLError(f"--num-cluster {','.join(map(str, ks))}: k={max(ks)} is larger than the {num_samples} "
                       f"training samples; choose every k <= {num_samples}")
    owned = (head[index.clamp(0, num_samples - 1)] == world - me) & _first_occurrences(index)  # n_r
    return owned, int(head[num_samples])


@torch.no_grad()
def kmeans_across_ranks(
    local_x: torch.Tensor,
    local_index: torch.Tensor,
    num_samples: int,
    k: int,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 5,
    should_stop: Callable[[], bool] | None = None,
    precision: str = "fp32",
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One k-means over the rows of every rank, each rank keeping its own: the torch k-means (faiss's semantics,
    see :func:`_torch_kmeans`) with the per-centroid sums and counts all-reduced at each Lloyd iteration.

    local_x: n_r x d float32 on this rank's device (0 x d for an empty shard: d is needed for the k x d
    collectives); local_index: n_r dataset indices of those rows. The index sets of the ranks must partition
    range(num_samples) (each sample on exactly one rank: :func:`run_kmeans_across_ranks` makes them so from
    any sampler's shards). Every rank must call this with the same num_samples, k, seed, niter, nredo and its
    features on the same kind of device (the draws come from a generator there), and ``should_stop`` must give
    the same answer on every rank (it is asked after every Lloyd iteration; True -> None on every rank).
    Collectives (all-reduces, the same on every rank whatever n_r): per run one of k x d, two per iteration
    (k, k x d), one of 1 for the objective. Distances in full float32 (TF32 off inside), as faiss's.

    Returns (centroids k x d, the same on every rank; squared distances n_r; assignments n_r) for this rank's
    rows, in the order given. With one process and the rows in dataset order: :func:`_torch_kmeans`'s result
    bit for bit (the same operations in the same order; the reductions are identities there).
    """
    x = local_x.detach().float()
    index = local_index.to(device=x.device, dtype=torch.long).reshape(-1)
    return _lloyd(x, index, num_samples, k, seed, niter, nredo, should_stop, across_ranks=True, precision=precision,
                  init=init)


@torch.no_grad()
def concentration_across_ranks(
    local_distances: torch.Tensor,
    local_assign: torch.Tensor,
    num_clusters: int,
    temperature: float,
    alpha: float = 10.0,
) -> torch.Tensor:
    """phi (PCL Eq. 12) of :func:`estimate_concentration` from every rank's samples: each rank sums its own
    distances (float64) and counts per cluster, one all-reduce of 2 x k float64 adds them up, and the shared
    :func:`concentration_from_sums` clips and rescales. local_distances: n_r Euclidean (not squared) distances
    to the assigned centroid; local_assign: n_r. Each sample must be counted on exactly one rank. Returns
    float32 tensor[k], the same on every rank; with one process exactly :func:`estimate_concentration`'s."""
    d = local_distances.detach().reshape(-1).to(torch.float64)
    assign = local_assign.reshape(-1).to(device=d.device, dtype=torch.long)
    packed = torch.zeros(2, num_clusters, dtype=torch.float64, device=d.device)  # 2 x k: (distance sums, counts)
    packed[0].index_add_(0, assign, d)
    packed[1] = torch.bincount(assign, minlength=num_clusters)[:num_clusters].to(torch.float64)
    all_reduce_sum(packed)
    return concentration_from_sums(packed[0], packed[1], temperature, alpha)


@torch.no_grad()
def run_kmeans_across_ranks(
    local_x: torch.Tensor,
    local_index: torch.Tensor,
    num_samples: int,
    num_clusters: int | Sequence[int],
    temperature: float,
    *,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 5,
    should_stop: Callable[[], bool] | None = None,
    precision: str = "fp32",
    init: Sequence[torch.Tensor | None] | None = None,
) -> ClusterResult:
    """:func:`run_kmeans` (backend torch) with the features left where they were computed: every rank calls it
    with its own shard and gets the same full :class:`ClusterResult` (on its device).

    local_x: n_r x d, this rank's momentum features (n_r may be 0: then 0 x d or 0 x 0); local_index: n_r,
    their dataset indices in [0, num_samples). Shards may be unequal and may repeat samples (a padded
    sampler): each index is used once, from the lowest rank holding it; together they must cover every index.
    Per granularity g: :func:`kmeans_across_ranks` with seed + g, :func:`concentration_across_ranks`, and
    the full im2cluster (N) assembled by dataset index at the end (one :func:`gather_rows_exact` for all
    granularities). Centroids (unit rows) and phi are the same on every rank. ``should_stop`` is asked before
    and during each granularity and must answer alike on every rank (the caller agrees it over ranks); the
    result then holds the granularities done so far. Bad input (NaN rows, missing indices, k > N) and
    collapsed features raise the same :class:`PCLError` on every rank. With one process and the rows in
    dataset order: ``run_kmeans(features, ..., backend="torch")``'s result bit for bit.
    """
    ks = [num_clusters] if isinstance(num_clusters, int) else list(num_clusters)
    x = torch.as_tensor(local_x).detach().float()
    index = torch.as_tensor(local_index).to(device=x.device, dtype=torch.long).reshape(-1)
    if x.dim() != 2:
        x = x.reshape(index.shape[0], -1) if x.numel() else x.new_zeros(0, 0)
    owned, d = _shard_plan(x, index, num_samples, ks)
    if x.shape[0] == 0:
        x = x.new_zeros(0, d)
    x, index = x[owned].contiguous(), index[owned]  # n_o x d, n_o: the rows this rank counts
    logger.debug("k-means backend: torch on every rank (%d processes; %d of the %d samples here)",
                world_size(), index.shape[0], num_samples)
    result, assigns = ClusterResult(), []
    for g, k in enumerate(ks):
        if should_stop is not None and should_stop():
            logger.warning("k-means stopped before k=%d: a stop was requested", k)
            break
        start = time.perf_counter()
        out = kmeans_across_ranks(x, index, num_samples, k, seed + g, niter, nredo, should_stop, precision,
                                  _initial(init, g, k, d))
        if out is None:
            logger.warning("k-means stopped during k=%d: a stop was requested", k)
            break
        c, dist2, assign = out
        seconds = time.perf_counter() - start
        dist = dist2.clamp_min(0).sqrt()  # n_o
        phi = concentration_across_ranks(dist, assign, k, temperature)
        degenerate = int((~torch.isfinite(phi) | (phi <= 0)).sum())  # phi is the same on every rank: so is this
        if degenerate:
            total = all_reduce_sum(torch.stack([dist.to(torch.float64).sum(),
                                                torch.tensor(float(dist.shape[0]), dtype=torch.float64,
                                                             device=dist.device)]))
            raise PCLError(f"k={k}: {degenerate} prototypes get a zero or undefined concentration because their "
                           f"samples coincide (mean distance to the centroids {float(total[0] / total[1]):.2e}): "
                           f"the features have collapsed (or the data holds many exact duplicates); lower --lr or "
                           f"the extra loss weights (--pauc-*) and resume from an earlier checkpoint")
        assigns.append(assign)
        result.centroids.append(torch.nn.functional.normalize(c.float(), dim=1))
        result.concentration.append(phi.to(x.device))
        result.kmeans_seconds.append(seconds)
        total = all_reduce_sum(dist2.clamp_min(0).to(torch.float64).sum().reshape(1))  # one all-reduce of 1
        result.objective.append(float(total) / num_samples)
        logger.debug("k-means k=%d (torch, %d ranks): %.2f s", k, world_size(), seconds)
    if assigns:  # every rank has done the same granularities (should_stop is agreed): the same gather
        full = gather_rows_exact(torch.stack(assigns, dim=1), index, num_samples)  # N x G
        result.im2cluster = [full[:, g].contiguous() for g in range(len(assigns))]
    return result
