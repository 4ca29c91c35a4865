"""E-step: k-means at several granularities and the per-prototype concentration phi (PCL Eq. 12).

Backends behind one interface (:func:`run_kmeans`): faiss (GPU index when faiss has GPU support and the
features live on CUDA, CPU index otherwise) with the official settings, and a pure-PyTorch Lloyd k-means
(chunked distances) for machines whose faiss-gpu will not install.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pcl import ABANDONED_THREAD, PCLError

logger = logging.getLogger(__name__)


@dataclass
class ClusterResult:
    """One entry per granularity. im2cluster: LongTensor[N]; centroids: k x d (unit rows); concentration: k."""

    im2cluster: list[torch.Tensor] = field(default_factory=list)
    centroids: list[torch.Tensor] = field(default_factory=list)
    concentration: list[torch.Tensor] = field(default_factory=list)
    kmeans_seconds: list[float] = field(default_factory=list)  # per granularity, where it was computed (not saved)

    def to(self, device: torch.device | str) -> "ClusterResult":
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return ClusterResult(move(self.im2cluster), move(self.centroids), move(self.concentration),
                             list(self.kmeans_seconds))

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
    multi = counts > 1
    phi = torch.zeros(num_clusters, dtype=torch.float64, device=d.device)
    phi[multi] = sums[multi] / counts[multi] / torch.log(counts[multi] + alpha)
    phi_max = phi.max()
    phi[~multi] = phi_max
    if phi_max <= 0:  # no cluster with two distinct members: all equal concentration
        phi = torch.ones_like(phi)
    lo, hi = torch.quantile(phi, torch.tensor([0.1, 0.9], dtype=torch.float64, device=d.device))
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


def _faiss_kmeans(x: np.ndarray, k: int, seed: int, niter: int, nredo: int, gpu_device: int | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Official settings; returns (centroids k x d, squared distances N, assignments N). The flat L2 index lives
    on ``gpu_device`` alone, the calling process's own GPU (the official code shards it over every visible GPU:
    on a node with one process per GPU, rank 0 would then use the other ranks' GPUs too, which fails where GPUs
    are in exclusive-process mode and contends with their work elsewhere); None: on the CPU."""
    import faiss

    d = x.shape[1]
    clus = faiss.Clustering(d, k)
    clus.verbose = False
    clus.niter = niter
    clus.nredo = nredo
    clus.seed = seed
    clus.max_points_per_centroid = 1000
    clus.min_points_per_centroid = 10
    if gpu_device is not None:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        cfg.device = gpu_device
        index = faiss.GpuIndexFlatL2(res, d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
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


@torch.no_grad()
def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distance to, and index of, the nearest centroid. x: N x d; c: k x d -> (N, N)."""
    half_norm = -0.5 * (c * c).sum(dim=1)  # k
    best_d = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    best_i = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        score = torch.addmm(half_norm, xs, c.t())  # x.c - |c|^2/2 : chunk x k (argmax = nearest)
        val, idx = score.max(dim=1)
        best_d[s:s + chunk] = ((xs * xs).sum(dim=1) - 2 * val).clamp_min(0)
        best_i[s:s + chunk] = idx
    return best_d, best_i


SPLIT_EPS = 1.0 / 1024  # faiss's relative perturbation of a split centroid (Clustering.cpp, EPS)


@torch.no_grad()
def split_empty_clusters(c: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
    """Refill empty clusters as faiss's ``split_clusters`` does, in place; returns the number of splits.

    c: k x d centroids, counts: k cluster sizes (float or int, updated). For each empty cluster in turn, a donor
    is drawn with probability proportional to (size - 1) -- a singleton is never split -- the empty one gets a
    copy of the donor's centroid, and the two are pushed apart per dimension: even dimensions x (1 + eps) for
    the new one and x (1 - eps) for the donor, odd dimensions the other way round (a change of direction, not
    only of norm); the donor's members are then assumed split evenly. faiss draws donors by a cyclic scan with
    acceptance probability (size - 1) / (n - k), whose stationary choice is the same proportion.
    """
    empty = (counts == 0).nonzero().flatten().tolist()  # one sync; empty clusters are rare after the first steps
    if not empty:
        return 0
    sign = torch.ones(c.shape[1], dtype=c.dtype, device=c.device)
    sign[1::2] = -1  # even dims +, odd dims -
    for ci in empty:
        weight = (counts - 1).clamp_min(0).to(torch.float64)
        if float(weight.sum()) <= 0:
            break  # every cluster has <= 1 member: nothing to split (faiss would loop forever here)
        cj = int(torch.multinomial(weight, 1, generator=gen))
        c[ci] = c[cj] * (1 + SPLIT_EPS * sign)
        c[cj] = c[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


@torch.no_grad()
def _torch_kmeans(x: torch.Tensor, k: int, seed: int, niter: int, nredo: int,
                  should_stop: Callable[[], bool] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Lloyd k-means with faiss's semantics: random init from (a subsample of at most 1000 k) points,
    niter iterations, empty clusters refilled by :func:`split_empty_clusters`, the best of nredo runs by
    objective. Not bit-equal to faiss (its RNG), equal in distribution (measured: benchmarks/bench_kmeans.py).
    ``should_stop`` is asked after every Lloyd iteration: True -> None."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    n, d = x.shape
    train = x
    if n > 1000 * k:
        train = x[torch.randperm(n, generator=gen, device=x.device)[: 1000 * k]]
    best_obj, best_c = math.inf, None
    for _ in range(nredo):
        c = train[torch.randperm(train.shape[0], generator=gen, device=x.device)[:k]].clone()
        for _ in range(niter):
            dist2, assign = _nearest(train, c)
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, assign, train)
            nonempty = counts > 0
            c[nonempty] = sums[nonempty] / counts[nonempty, None].to(c.dtype)
            split_empty_clusters(c, counts, gen)
            if should_stop is not None and should_stop():
                return None
        obj = float(_nearest(train, c)[0].sum())
        if obj < best_obj:
            best_obj, best_c = obj, c
    dist2, assign = _nearest(x, best_c)
    return best_c, dist2, assign


def _faiss_status() -> tuple[bool, int]:
    """(faiss importable, number of GPUs its build can use)."""
    try:
        import faiss
    except ImportError:
        return False, 0
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
            raise PCLError("--kmeans-backend faiss: faiss is not installed (pip install faiss-cpu, or "
                           "pip install -e \".[gpu]\" for faiss on the GPU)")
        where = "GPU" if device.type == "cuda" and gpus else "CPU"
        return "faiss", f"--kmeans-backend faiss (faiss on the {where})"
    if device.type == "cuda":
        if has_faiss and gpus:
            return "faiss", f"auto: features on {device} and faiss has GPU support ({gpus} GPUs)"
        reason = "faiss has no GPU support (faiss-cpu)" if has_faiss else "faiss is not installed"
        return "torch", f"auto: features on {device} and {reason}: the torch k-means on {device}"
    if has_faiss:
        return "faiss", "auto: features on the CPU, faiss installed"
    return "torch", "auto: features on the CPU, faiss is not installed: the torch k-means"


def kmeans(x: torch.Tensor, k: int, seed: int = 0, niter: int = 20, nredo: int = 5, backend: str = "auto",
           should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One k-means on x: N x d with the resolved backend: (centroids k x d, squared distances N, assignments N),
    on the device of x (unnormalised centroids; no concentration). On CUDA it uses x's GPU only. None when
    ``should_stop()`` said so (asked between Lloyd iterations, or every half second while faiss runs)."""
    backend = resolve_backend(backend, x.device)[0]
    if backend == "faiss":
        host = x.detach().float().cpu().numpy()
        out = interruptible(lambda: _faiss_kmeans(host, k, seed, niter, nredo, _faiss_gpu_device(x)), should_stop)
        return None if out is None else tuple(torch.from_numpy(a).to(x.device) for a in out)
    return _torch_kmeans(x.detach().float(), k, seed, niter, nredo, should_stop)


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
) -> ClusterResult:
    """k-means at each granularity (seed + granularity index, as official), then phi.

    features: N x d (the momentum features; the official code uses unit rows). Returns a ClusterResult on
    the device of ``features`` with L2-normalised centroids. ``should_stop`` is asked before each granularity
    and during each (see :func:`kmeans`); when it says yes the result holds only the granularities done so far.
    """
    ks = [num_clusters] if isinstance(num_clusters, int) else list(num_clusters)
    x = torch.as_tensor(features).detach().float().contiguous()
    check_features(x, ks)
    backend, why = resolve_backend(backend, x.device)
    logger.info("k-means backend: %s (%s)", backend, why)
    result = ClusterResult()
    for g, k in enumerate(ks):
        if should_stop is not None and should_stop():
            logger.warning("k-means stopped before k=%d: a stop was requested", k)
            break
        start = time.perf_counter()
        out = kmeans(x, k, seed + g, niter, nredo, backend, should_stop)
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
        logger.info("k-means k=%d (%s): %.2f s", k, backend, seconds)
    return result
