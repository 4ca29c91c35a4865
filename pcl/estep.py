"""The E-step: momentum features of the whole training set, k-means per granularity and the concentration phi
on rank 0, broadcast so that every rank holds the same prototypes; and its start-up rehearsal."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn

from pcl import PCLError, distributed as dist_utils
from pcl.cluster import ClusterResult, check_same_on_ranks, resolve_backend, run_kmeans, run_kmeans_across_ranks
from pcl.features import extract_features, shard_features
from pcl.model import unwrap
from pcl.preemption import StopRequest, Stopped
from pcl.settings import EStepSettings

logger = logging.getLogger("pcl")


@dataclass
class EStep:
    """One E-step's result: the prototypes (the same on every rank) and what the monitor may look at once."""
    clusters: ClusterResult
    features: torch.Tensor | None  # N x C momentum features on rank 0 (for the galleries), None on the others
    feature_seconds: float
    kmeans_seconds: list[float]  # per granularity
    seconds: float  # features + k-means + phi + broadcast
    seed: int = 0  # the k-means seed (granularity g: seed + g)


def _key_encoder(model: nn.Module, device: torch.device, stop: StopRequest | None
                 ) -> tuple[nn.Module, Callable[[], bool] | None, list[bool]]:
    """(the MoCo model in eval mode with rank 0's BN statistics on every rank, as DDP's forward would have them;
    a per-batch stop check agreed over ranks, or None; the list it marks when a stop came)."""
    moco = unwrap(model)
    moco.eval()
    dist_utils.broadcast_buffers(moco.encoder_k)
    stopped: list[bool] = []

    def should_stop() -> bool:
        if stop.poll(device):
            stopped.append(True)
        return bool(stopped)

    return moco, (should_stop if stop is not None else None), stopped


def _momentum_features(model: nn.Module, loader, device: torch.device, num_samples: int, progress: bool,
                       stop: StopRequest | None, dst: int | None) -> torch.Tensor | None:
    """The key encoder's N x C features (on every rank, or on rank ``dst`` only: None on the others); raises
    :class:`Stopped` on every rank when a stop request (agreed over ranks, polled after every batch) came."""
    moco, should_stop, stopped = _key_encoder(model, device, stop)
    features = extract_features(moco.encode_key, loader, device, num_samples, normalize=False, progress=progress,
                                should_stop=should_stop, dst=dst)
    if stopped:
        raise Stopped()
    return features


def _cluster_across_ranks(model: nn.Module, loader, device: torch.device, num_samples: int,
                          settings: EStepSettings, stop: StopRequest | None, seed: int = 0
                          ) -> tuple[ClusterResult, torch.Tensor | None, float, list[float]]:
    """--kmeans-backend torch-ranks: every rank encodes its shard and keeps it; the PyTorch k-means runs on all
    ranks' rows at once (per-centroid sums all-reduced every Lloyd iteration, phi from all-reduced per-cluster
    sums; no N x d gather), so every rank ends with the same prototypes. With --prototype-gallery rank 0 also
    gathers the features (what the official path holds anyway). Returns (prototypes, rank 0's features or None,
    feature seconds, k-means seconds per granularity)."""
    start = time.perf_counter()
    moco, should_stop, stopped = _key_encoder(model, device, stop)
    shard = shard_features(moco.encode_key, loader, device, moco.queue.shape[0], normalize=False,
                           progress=settings.progress and dist_utils.is_main(), should_stop=should_stop)
    if stopped:
        raise Stopped()
    rows, index = shard
    features = (dist_utils.gather_rows_exact(rows, index, num_samples, 0) if settings.keep_features else None)
    feature_seconds = time.perf_counter() - start
    agreed = (lambda: stop.requested(device)) if stop is not None else None
    result = run_kmeans_across_ranks(rows, index, num_samples, settings.num_cluster, settings.temperature, seed=seed,
                                     niter=settings.niter, nredo=settings.nredo, should_stop=agreed,
                                     precision=settings.precision)  # granularity g: seed + g; one shard plan
    if len(result.im2cluster) < len(settings.num_cluster):
        raise Stopped()
    return result, features, feature_seconds, list(result.kmeans_seconds)


@torch.no_grad()
def compute_features(model: nn.Module, loader, device: torch.device, num_samples: int,
                     progress: bool = True) -> torch.Tensor:
    """Momentum-encoder features (eval mode, center crop) of the whole training set: N x C on ``device`` on every
    rank, each sample computed once by one rank and gathered exactly (memory: see ``extract_features``)."""
    return _momentum_features(model, loader, device, num_samples, progress, None, None)


def _cluster_on_rank0(features: torch.Tensor | None, shape: tuple[int, int], settings: EStepSettings,
                      device: torch.device, stop: StopRequest | None, seed: int = 0
                      ) -> tuple[ClusterResult, list[float]]:
    """k-means + phi on rank 0 (``features``: N x d there, None on the others; ``shape`` = (N, d) everywhere),
    broadcast so that every rank holds the same result; with rank 0's k-means seconds per granularity. Raises
    :class:`Stopped` on every rank when rank 0 stopped early for a stop request; an error there (collapsed
    features, a broken backend) is raised on every rank.
    Collectives, the same on every rank: two object broadcasts, then 3 tensors per granularity."""
    ks = settings.num_cluster
    should_stop = (lambda: stop.signal_name is not None) if stop is not None else None
    result = dist_utils.main_only(lambda: run_kmeans(features, ks, settings.temperature, seed=seed,
                                                     niter=settings.niter, nredo=settings.nredo,
                                                     backend=settings.backend, should_stop=should_stop,
                                                     precision=settings.precision),
                                  "the E-step's k-means")
    done = dist_utils.broadcast_object(None if result is None or len(result.im2cluster) < len(ks)
                                       else result.kmeans_seconds)
    if done is None:  # rank 0 stopped between granularities or Lloyd iterations
        raise Stopped()
    if not dist_utils.is_main():
        n, d = shape
        result = ClusterResult([torch.empty(n, dtype=torch.long, device=device) for _ in ks],
                               [torch.empty(k, d, device=device) for k in ks],
                               [torch.empty(k, device=device) for k in ks])
    result = result.to(device)
    for tensors in (result.im2cluster, result.centroids, result.concentration):
        for t in tensors:
            dist_utils.broadcast_(t, 0)
    return result, list(done)


def e_step(model: nn.Module, loader, num_samples: int, settings: EStepSettings, device: torch.device,
           stop: StopRequest | None = None, epoch: int = 0) -> EStep:
    """Features, k-means per granularity and phi on rank 0, broadcast so every rank holds the same prototypes.
    It computes only: what is logged of it is :class:`pcl.monitor.Monitor`'s.

    What each rank does: encodes its shard of the training set (``loader``) with the key encoder (eval mode, rank
    0's BN statistics) and sends it to rank 0, which alone holds the N x C features, clusters them and computes
    phi; then every rank receives the assignments, centroids and phi. A ``stop`` request (checked per feature
    batch and, on rank 0, between Lloyd iterations) raises :class:`Stopped` on every rank. ``epoch`` only matters
    with --kmeans-reseed (the seed is drawn from it)."""
    start, seed = time.perf_counter(), settings.kmeans_seed(epoch)
    if settings.backend == "torch-ranks":
        clusters, features, feature_seconds, kmeans_seconds = _cluster_across_ranks(model, loader, device,
                                                                                    num_samples, settings, stop, seed)
    else:
        features = _momentum_features(model, loader, device, num_samples,
                                      settings.progress and dist_utils.is_main(), stop, 0)
        feature_seconds = time.perf_counter() - start
        clusters, kmeans_seconds = _cluster_on_rank0(features, (num_samples, unwrap(model).queue.shape[0]),
                                                     settings, device, stop, seed)
    check_same_on_ranks(clusters, f"the E-step at epoch {epoch}")  # one all-gather of 2 x 3G int64
    if settings.fixed_concentration:  # ablation: one temperature for every prototype
        clusters.concentration = [torch.full_like(phi, settings.temperature) for phi in clusters.concentration]
    return EStep(clusters, features, feature_seconds, kmeans_seconds, time.perf_counter() - start, seed)


SELF_CHECK_ROWS = 4096  # rows of the start-up rehearsal: enough for k-means at k <= 64 (faiss wants 10 per k)


def self_check(settings: EStepSettings, device: torch.device, dim: int) -> float:
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
    rehearsal = replace(settings, num_cluster=tuple(min(k, 64) for k in settings.num_cluster), niter=2, nredo=1)
    if settings.backend == "torch-ranks":  # every rank clusters its own rows with the others'
        result = run_kmeans_across_ranks(x[mine].to(device), mine.to(device), n, rehearsal.num_cluster,
                                         settings.temperature, niter=2, nredo=1)
    else:
        result = _cluster_on_rank0(gathered, (n, dim), rehearsal, device, None)[0]
    check_same_on_ranks(result, "start-up check of the E-step")
    digest = torch.stack([a.sum() for a in result.im2cluster]).to(torch.float64)  # same on every rank?
    spread = dist_utils.all_reduce_sum(digest.clone()) - world * digest
    if spread.abs().max() > 0:
        raise PCLError("start-up check of the E-step: ranks received different cluster assignments from rank 0 "
                       "(a broadcast is broken: check the NCCL/gloo setup)")
    seconds = time.perf_counter() - start
    logger.info("E-step start-up check: %d ranks, k-means (%s) on %d rows and its broadcast: ok in %.2f s", world,
                "torch on every rank" if settings.backend == "torch-ranks" else resolve_backend(settings.backend,
                                                                                               device)[0], n, seconds)
    return seconds
