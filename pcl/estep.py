"""The E-step: momentum features of the whole training set, k-means per granularity and the concentration phi
on rank 0, broadcast so that every rank holds the same :class:`ClusterResult`; and what each E-step logs."""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn

from pcl import PCLError, distributed as dist_utils
from pcl.cluster import ClusterResult, resolve_backend, run_kmeans
from pcl.config import RunConfig
from pcl.data import PretrainData
from pcl.features import extract_features
from pcl.gallery import gallery_rows
from pcl.preemption import StopRequest

logger = logging.getLogger("pcl")


def _momentum_features(model: nn.Module, loader, device: torch.device, num_samples: int, progress: bool,
                       stop: StopRequest | None, dst: int | None) -> tuple[torch.Tensor | None, bool]:
    """(features, stopped): the key encoder's N x C features (on every rank, or on rank ``dst`` only: None on the
    others), and whether a stop request (agreed over ranks, polled after every batch) ended the pass early."""
    moco = model.module if hasattr(model, "module") else model
    moco.eval()
    dist_utils.broadcast_buffers(moco.encoder_k)  # rank 0's BN statistics on every rank, as DDP's forward would
    stopped = []

    def should_stop() -> bool:
        if stop.poll(device):
            stopped.append(True)
        return bool(stopped)

    features = extract_features(moco.encode_key, loader, device, num_samples, normalize=False, progress=progress,
                                should_stop=should_stop if stop is not None else None, dst=dst)
    return (None, True) if stopped else (features, False)


@torch.no_grad()
def compute_features(model: nn.Module, loader, device: torch.device, num_samples: int,
                     progress: bool = True, stop: StopRequest | None = None) -> torch.Tensor | None:
    """Momentum-encoder features (eval mode, center crop) of the whole training set: N x C on ``device`` on every
    rank, each sample computed once by one rank and gathered exactly (memory: see ``extract_features``).
    With ``stop``, a stop request (agreed over ranks) is checked after every batch: then None on every rank.
    """
    return _momentum_features(model, loader, device, num_samples, progress, stop, None)[0]


def _cluster_on_rank0(features: torch.Tensor | None, shape: tuple[int, int], cfg: RunConfig, device: torch.device,
                      stop: StopRequest | None) -> ClusterResult | None:
    """k-means + phi on rank 0 (``features``: N x d there, None on the others; ``shape`` = (N, d) everywhere),
    broadcast so that every rank holds the same result. None on every rank when rank 0 stopped early for a
    stop request; an error there (collapsed features, a broken backend) is raised on every rank.
    Collectives, the same on every rank: two object broadcasts, then 3 tensors per granularity."""
    should_stop = (lambda: stop.signal_name is not None) if stop is not None else None
    result = dist_utils.main_only(lambda: run_kmeans(features, cfg.num_cluster, cfg.temperature, seed=0,
                                                     niter=cfg.kmeans_niter, nredo=cfg.kmeans_nredo,
                                                     backend=cfg.kmeans_backend, should_stop=should_stop),
                                  "the E-step's k-means")
    done = dist_utils.broadcast_object(None if result is None or len(result.im2cluster) < len(cfg.num_cluster)
                                       else result.kmeans_seconds)
    if done is None:  # rank 0 stopped between granularities or Lloyd iterations
        return None
    if not dist_utils.is_main():
        n, d = shape
        result = ClusterResult([torch.empty(n, dtype=torch.long, device=device) for _ in cfg.num_cluster],
                               [torch.empty(k, d, device=device) for k in cfg.num_cluster],
                               [torch.empty(k, device=device) for k in cfg.num_cluster], list(done))
    result = result.to(device)
    for tensors in (result.im2cluster, result.centroids, result.concentration):
        for t in tensors:
            dist_utils.broadcast_(t, 0)
    return result


def e_step(model: nn.Module, data: PretrainData, cfg: RunConfig, device: torch.device,
           epoch: int, stop: StopRequest | None = None) -> ClusterResult | None:
    """Features, k-means per granularity and phi on rank 0, broadcast so every rank holds the same result.

    What each rank does: encodes its shard of the training set with the key encoder (eval mode, rank 0's BN
    statistics) and sends it to rank 0, which alone holds the N x C features, clusters them and computes phi;
    then every rank receives the assignments, centroids and phi. None on every rank when ``stop`` was requested
    during it (checked per feature batch and, on rank 0, between Lloyd iterations): the caller saves the epoch
    boundary and stops."""
    start = time.perf_counter()
    progress = dist_utils.is_main() and not cfg.no_progress
    moco = model.module if hasattr(model, "module") else model
    features, stopped = _momentum_features(model, data.eval_loader, device, data.num_samples, progress, stop, 0)
    if stopped:
        return None
    feat_seconds = time.perf_counter() - start
    result = _cluster_on_rank0(features, (data.num_samples, moco.queue.shape[0]), cfg, device, stop)
    if result is None:
        return None
    if cfg.get("fixed_concentration", False):  # ablation: one temperature for every prototype
        result.concentration = [torch.full_like(phi, cfg.temperature) for phi in result.concentration]
    if cfg.get("prototype_gallery", False):  # rank 0: O(N) + the shown clusters' rows
        result.gallery = dist_utils.main_only(lambda: [
            gallery_rows(features, a, c, phi, seed=cfg.seed)
            for a, c, phi in zip(result.im2cluster, result.centroids, result.concentration)], "the gallery") or []
    del features
    result.estep_seconds = time.perf_counter() - start
    logger.info("E-step epoch %d: features %.1f s, k-means %s s, total %.1f s", epoch, feat_seconds,
                "/".join(f"{s:.1f}" for s in result.kmeans_seconds), result.estep_seconds)
    return result


SELF_CHECK_ROWS = 4096  # rows of the start-up rehearsal: enough for k-means at k <= 64 (faiss wants 10 per k)


def self_check(cfg: RunConfig, device: torch.device, dim: int) -> float:
    """Rehearse the E-step at start-up on a few thousand synthetic rows (seconds), so that a broken k-means
    backend (a faiss wheel that cannot use the GPU) or a collective that does not go through shows up before
    the first epoch, not hours later at the first E-step (--warmup-epoch). Every rank sends an unequal shard to
    rank 0, which clusters with the chosen backend (k capped at 64, 2 iterations) and broadcasts; every rank
    then checks it holds rank 0's result. Returns the seconds it took."""
    start = time.perf_counter()
    rank, world, n = dist_utils.rank(), dist_utils.world_size(), SELF_CHECK_ROWS + 1  # + 1: unequal shards
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    mine = torch.arange(rank, n, world)
    gathered = dist_utils.gather_rows_exact(x[mine].to(device), mine.to(device), n, dst=0)

    def verify() -> None:
        if not torch.equal(gathered.cpu(), x):
            raise PCLError("start-up check of the E-step: the features gathered on rank 0 differ from what the "
                           "ranks sent (a collective is broken: check the NCCL/gloo setup)")

    dist_utils.main_only(verify, "the start-up check")
    rehearsal = cfg.replace(num_cluster=tuple(min(k, 64) for k in cfg.num_cluster), kmeans_niter=2, kmeans_nredo=1)
    result = _cluster_on_rank0(gathered, (n, dim), rehearsal, device, None)
    digest = torch.stack([a.sum() for a in result.im2cluster]).to(torch.float64)  # same on every rank?
    spread = dist_utils.all_reduce_sum(digest.clone()) - world * digest
    if spread.abs().max() > 0:
        raise PCLError("start-up check of the E-step: ranks received different cluster assignments from rank 0 "
                       "(a broadcast is broken: check the NCCL/gloo setup)")
    seconds = time.perf_counter() - start
    logger.info("E-step start-up check: %d ranks, k-means (%s) on %d rows and its broadcast: ok in %.2f s", world,
                resolve_backend(cfg.kmeans_backend, device)[0], n, seconds)
    return seconds
