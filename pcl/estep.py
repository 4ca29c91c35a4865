"""The E-step: momentum features of the whole training set, k-means per granularity and the concentration phi
on rank 0, broadcast so that every rank holds the same prototypes; and its start-up rehearsal."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from pcl import PCLError, distributed as dist_utils
from pcl.cluster import ClusterResult, check_same_on_ranks, resolve_backend, run_kmeans, run_kmeans_across_ranks
from pcl.features import FeatureBank, extract_features, nmi, shard_features
from pcl.model import channels_last, unwrap
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
    seconds: float  # features + k-means + phi + broadcast (+ the warm-start check when it ran)
    seed: int = 0  # the k-means seed (granularity g: seed + g)
    filled: int = 0  # --estep-features bank: rows the feature pass filled (never written by a training step)
    warm: bool = False  # the k-means started from the previous E-step's centroids
    warm_check: dict[str, float] = field(default_factory=dict)  # cold-start objective, NMI(warm, cold) per k


def _key_encoder(model: nn.Module, device: torch.device, stop: StopRequest | None, amp: str = "none",
                 nhwc: bool = False) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], bool] | None,
                                              list[bool]]:
    """(the momentum encoder in eval mode with rank 0's BN statistics on every rank, as DDP's forward would have
    them, as a function of a batch: under ``amp`` (bf16/fp16 autocast; "none": fp32) with NHWC inputs when
    ``nhwc``, its features in fp32; a per-batch stop check agreed over ranks, or None; the list it marks when a
    stop came)."""
    moco = unwrap(model)
    moco.eval()
    dist_utils.broadcast_buffers(moco.encoder_k)
    stopped: list[bool] = []

    def should_stop() -> bool:
        if stop.poll(device):
            stopped.append(True)
        return bool(stopped)

    def encode(images: torch.Tensor) -> torch.Tensor:
        if nhwc:
            images = images.contiguous(memory_format=torch.channels_last)
        if amp == "none":
            return moco.encode_key(images)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16):
            return moco.encode_key(images).float()

    return encode, (should_stop if stop is not None else None), stopped


def _momentum_features(model: nn.Module, loader, device: torch.device, num_samples: int, progress: bool,
                       stop: StopRequest | None, dst: int | None, settings: EStepSettings | None = None
                       ) -> torch.Tensor | None:
    """The key encoder's N x C features (on every rank, or on rank ``dst`` only: None on the others); raises
    :class:`Stopped` on every rank when a stop request (agreed over ranks, polled after every batch) came."""
    encode, should_stop, stopped = _key_encoder(model, device, stop, *_speed(settings, device))
    features = extract_features(encode, loader, device, num_samples, normalize=False, progress=progress,
                                should_stop=should_stop, dst=dst)
    if stopped:
        raise Stopped()
    return features


def _momentum_shard(model: nn.Module, loader, device: torch.device, progress: bool, stop: StopRequest | None,
                    settings: EStepSettings | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's key-encoder rows of ``loader`` and their dataset indices, nothing gathered; :class:`Stopped`
    on every rank when a stop request came."""
    encode, should_stop, stopped = _key_encoder(model, device, stop, *_speed(settings, device))
    shard = shard_features(encode, loader, device, unwrap(model).queue.shape[0], normalize=False, progress=progress,
                           should_stop=should_stop)
    if stopped:
        raise Stopped()
    return shard


def _speed(settings: EStepSettings | None, device: torch.device) -> tuple[str, bool]:
    """The feature pass's (--amp, channels-last in effect) from the run's settings; (fp32, NCHW) without them."""
    if settings is None:
        return "none", False
    return settings.amp, channels_last(settings.channels_last, device)


@torch.no_grad()
def compute_features(model: nn.Module, loader, device: torch.device, num_samples: int,
                     progress: bool = True) -> torch.Tensor:
    """Momentum-encoder features (eval mode, center crop) of the whole training set: N x C on ``device`` on every
    rank, each sample computed once by one rank and gathered exactly (memory: see ``extract_features``)."""
    return _momentum_features(model, loader, device, num_samples, progress, None, None)


def _cluster_on_rank0(features: torch.Tensor | None, shape: tuple[int, int], settings: EStepSettings,
                      device: torch.device, stop: StopRequest | None, seed: int = 0,
                      init: list[torch.Tensor] | None = None) -> tuple[ClusterResult, list[float]]:
    """k-means + phi on rank 0 (``features``: N x d there, None on the others; ``shape`` = (N, d) everywhere),
    broadcast so that every rank holds the same result; with rank 0's k-means seconds per granularity. Raises
    :class:`Stopped` on every rank when rank 0 stopped early for a stop request; an error there (collapsed
    features, a broken backend) is raised on every rank. ``init``: warm-start centroids per granularity.
    Collectives, the same on every rank: two object broadcasts, then 3 tensors per granularity."""
    ks = settings.num_cluster
    should_stop = (lambda: stop.signal_name is not None) if stop is not None else None
    result = dist_utils.main_only(lambda: run_kmeans(features, ks, settings.temperature, seed=seed,
                                                     niter=settings.niter, nredo=settings.nredo,
                                                     backend=settings.backend, should_stop=should_stop,
                                                     precision=settings.precision, init=init),
                                  "the E-step's k-means")
    done = dist_utils.broadcast_object(None if result is None or len(result.im2cluster) < len(ks)
                                       else (result.kmeans_seconds, result.objective))
    if done is None:  # rank 0 stopped between granularities or Lloyd iterations
        raise Stopped()
    if not dist_utils.is_main():
        n, d = shape
        result = ClusterResult([torch.empty(n, dtype=torch.long, device=device) for _ in ks],
                               [torch.empty(k, d, device=device) for k in ks],
                               [torch.empty(k, device=device) for k in ks], list(done[0]), list(done[1]))
    result = result.to(device)
    for tensors in (result.im2cluster, result.centroids, result.concentration):
        for t in tensors:
            dist_utils.broadcast_(t, 0)
    return result, list(done[0])


def _cluster_shards(rows: torch.Tensor, index: torch.Tensor, num_samples: int, settings: EStepSettings,
                    device: torch.device, stop: StopRequest | None, seed: int,
                    init: list[torch.Tensor] | None) -> tuple[ClusterResult, list[float]]:
    """--kmeans-backend torch-ranks: the PyTorch k-means on every rank's own rows at once (per-centroid sums
    all-reduced every Lloyd iteration, phi from all-reduced per-cluster sums; no N x d gather), so every rank
    ends with the same prototypes; :class:`Stopped` on every rank when a stop request came."""
    agreed = (lambda: stop.requested(device)) if stop is not None else None
    result = run_kmeans_across_ranks(rows, index, num_samples, settings.num_cluster, settings.temperature, seed=seed,
                                     niter=settings.niter, nredo=settings.nredo, should_stop=agreed,
                                     precision=settings.precision, init=init)  # granularity g: seed + g
    if len(result.im2cluster) < len(settings.num_cluster):
        raise Stopped()
    return result, list(result.kmeans_seconds)


def _fill_bank(model: nn.Module, bank: FeatureBank, fill_loader: Callable[[torch.Tensor], Any],
               device: torch.device, settings: EStepSettings, stop: StopRequest | None) -> int:
    """Encode the samples no training step has written into ``bank`` yet (a fresh run, or a sample every epoch's
    sampler dropped), those only, and write them on every rank; returns how many."""
    missing = bank.missing()  # the same on every rank
    if missing.numel() == 0:
        return 0
    rows, index = _momentum_shard(model, fill_loader(missing.cpu()), device,
                                  settings.progress and dist_utils.is_main(), stop, settings)
    full = dist_utils.gather_rows_exact(rows, index, bank.features.shape[0])  # N x d, zero outside `missing`
    bank.fill(full[missing], missing)
    return int(missing.numel())


def _warm_start(settings: EStepSettings, previous: ClusterResult | None, dim: int) -> list[torch.Tensor] | None:
    """--kmeans-init previous: the previous E-step's centroids when it clustered the same granularities at the
    same dimension (else a cold start, said once)."""
    if settings.init != "previous" or previous is None or not previous.centroids:
        return None
    shapes = [tuple(c.shape) for c in previous.centroids]
    if shapes != [(k, dim) for k in settings.num_cluster]:
        logger.info("--kmeans-init previous: the previous prototypes are %s, this E-step needs k=%s: a cold start",
                    shapes, ",".join(map(str, settings.num_cluster)))
        return None
    return list(previous.centroids)


def e_step(model: nn.Module, loader, num_samples: int, settings: EStepSettings, device: torch.device,
           stop: StopRequest | None = None, epoch: int = 0, bank: FeatureBank | None = None,
           fill_loader: Callable[[torch.Tensor], Any] | None = None, previous: ClusterResult | None = None) -> EStep:
    """Features, k-means per granularity and phi, so that every rank holds the same prototypes. It computes
    only: what is logged of it is :class:`pcl.monitor.Monitor`'s.

    Features: ``--estep-features pass`` (official) encodes the training set (``loader``: this rank's shard, centre
    crops) with the key encoder (eval mode, rank 0's BN statistics); ``bank`` takes the keys the training steps
    wrote into ``bank``, after a feature pass over the rows never written (``fill_loader(indices)``: a loader over
    those samples). k-means: on rank 0, which alone holds the N x C features (or on every rank's shard with
    --kmeans-backend torch-ranks), from random rows, or with ``--kmeans-init previous`` from ``previous``'s
    centroids (every --kmeans-warm-check E-steps also from random rows, to compare). A ``stop`` request (checked
    per feature batch and between Lloyd iterations) raises :class:`Stopped` on every rank. ``epoch`` sets the seed
    with --kmeans-reseed and the warm-start check's cadence."""
    start, seed = time.perf_counter(), settings.kmeans_seed(epoch)
    dim, filled, main = unwrap(model).queue.shape[0], 0, dist_utils.is_main()
    progress = settings.progress and main
    if settings.features == "bank":
        filled = _fill_bank(model, bank, fill_loader, device, settings, stop)
        rows = bank.features if main or settings.backend == "torch-ranks" else None
    elif settings.backend == "torch-ranks":
        rows, index = _momentum_shard(model, loader, device, progress, stop, settings)
    else:
        rows = _momentum_features(model, loader, device, num_samples, progress, stop, 0, settings)
    if settings.features == "bank" and settings.backend == "torch-ranks":  # each rank clusters every world-th row
        index = torch.arange(dist_utils.rank(), num_samples, dist_utils.world_size(), device=device)
        rows = rows[index]
    feature_seconds = time.perf_counter() - start

    def cluster(init: list[torch.Tensor] | None) -> tuple[ClusterResult, list[float]]:
        if settings.backend == "torch-ranks":
            return _cluster_shards(rows, index, num_samples, settings, device, stop, seed, init)
        return _cluster_on_rank0(rows, (num_samples, dim), settings, device, stop, seed, init)

    init = _warm_start(settings, previous, dim)
    clusters, kmeans_seconds = cluster(init)
    check_same_on_ranks(clusters, f"the E-step at epoch {epoch}")  # one all-gather of 2 x 3G int64
    check = {}
    if init is not None and settings.warm_check and epoch % settings.warm_check == 0:
        started = time.perf_counter()
        check = _compare_with_cold(clusters, cluster(None)[0], settings.num_cluster)
        check["warm_check_seconds"] = time.perf_counter() - started  # part of this E-step's seconds
    if settings.fixed_concentration:  # ablation: one temperature for every prototype
        clusters.concentration = [torch.full_like(phi, settings.temperature) for phi in clusters.concentration]
    if settings.features == "bank":
        features = bank.features if main and settings.keep_features else None
    else:
        features = _for_galleries(rows, index if settings.backend == "torch-ranks" else None, num_samples, settings)
    return EStep(clusters, features, feature_seconds, kmeans_seconds, time.perf_counter() - start, seed, filled,
                 init is not None, check)


def _compare_with_cold(warm: ClusterResult, cold: ClusterResult, ks: tuple[int, ...]) -> dict[str, float]:
    """What the warm start costs in quality, per granularity: the cold start's objective next to the warm one's
    (logged as kmeans_obj_k*), and the NMI (percent) between the two assignments."""
    out = {}
    for k, a, b, obj in zip(ks, warm.im2cluster, cold.im2cluster, cold.objective):
        out[f"kmeans_obj_cold_k{k}"] = obj
        out[f"nmi_warm_cold_k{k}"] = nmi(a, b)
    return out


def _for_galleries(rows: torch.Tensor | None, index: torch.Tensor | None, num_samples: int,
                   settings: EStepSettings) -> torch.Tensor | None:
    """Rank 0's N x C features for the galleries (--prototype-gallery), None elsewhere: what it holds already, or
    with torch-ranks the shards gathered there (the same collective on every rank)."""
    if not settings.keep_features:
        return None
    if index is not None:
        return dist_utils.gather_rows_exact(rows, index, num_samples, 0)
    return rows if dist_utils.is_main() else None


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
