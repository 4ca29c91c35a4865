"""What pretraining observes, and only observes: the E-step's cluster statistics and timings, the prototype
galleries, the kNN/NMI monitor on the labelled test split (within a memory budget on rank 0), and the final kNN
report. Every rank calls the same methods (the monitor's feature passes are collectives); rank 0 writes."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcl import distributed as dist_utils
from pcl.cluster import ClusterResult
from pcl.config import RunConfig
from pcl.data import PretrainData
from pcl.features import clustering_scores, extract_features, knn_accuracy
from pcl.gallery import caption, render_gallery
from pcl.log import RunLog

logger = logging.getLogger("pcl")


MONITOR_BANK_BYTES = 8 << 30  # the kNN monitor's budget for one feature bank on rank 0 (see bank_stride)


def bank_stride(num_rows: int, dim: int, budget_bytes: int) -> int:
    """Keep every m-th row so that an N x d fp32 bank fits ``budget_bytes`` on rank 0 (x2: the gathered buffer and
    the assembled bank coexist for a moment); 1 when it fits. ImageNet's 2048-d bank is 10.5 GB, 21 GB in transit."""
    return max(1, math.ceil(2 * 4 * num_rows * dim / budget_bytes))


def pixel_side(num_rows: int, image_size: int, budget_bytes: int) -> int:
    """The raw-pixel baseline's side s (images average-pooled to s x s) for an N x 3 s^2 fp32 bank within the
    budget; ``image_size`` when the full resolution fits. At ImageNet scale 224 px would need 771 GB."""
    side = image_size
    while side > 1 and 2 * 4 * num_rows * 3 * side * side > budget_bytes:
        side -= 1
    return side


def _monitor_encoder(encoder: nn.Module | None, num_rows: int, image_size: int, budget: int
                     ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, int, str]:
    """(encoder, bank stride, what was cut) for one monitor pass within the budget."""
    if encoder is None:
        side = pixel_side(num_rows, image_size, budget)
        if side == image_size:
            return None, 1, ""
        pooled = lambda x: F.adaptive_avg_pool2d(x, side)  # noqa: E731
        return pooled, 1, f"raw pixels average-pooled to {side} x {side} px"
    stride = bank_stride(num_rows, getattr(encoder, "feature_dim", 2048), budget)
    return encoder, stride, f"every {stride}th training image in the bank" if stride > 1 else ""


def coprime_stride(stride: int, world: int) -> int:
    """The smallest stride >= ``stride`` sharing no factor with the number of ranks: shards are round-robin (rank r
    holds r, r + W, ...), so with a common factor g only 1/g of the ranks would keep rows and the gathered buffer,
    padded to the largest shard, would be g times the planned bank."""
    while math.gcd(stride, world) != 1:
        stride += 1
    return stride


def monitor_scores(encoder: nn.Module | None, knn_sets: tuple[Any, torch.Tensor, Any, torch.Tensor],
                   device: torch.device, k: int = 20, temperature: float = 0.07, with_nmi: bool = True,
                   kmeans_backend: str = "auto", budget_bytes: int = MONITOR_BANK_BYTES, image_size: int = 224,
                   should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """On a labelled test split: weighted kNN top-1 (percent; the training split as the memory bank) and, with
    ``with_nmi``, ``test_nmi``: NMI (percent) of k-means with k = the number of classes on the L2-normalised
    test features. ``knn_sets``: (bank loader, bank labels, test loader, test labels), as ``PretrainData.knn``
    holds them. Every rank encodes its shard; rank 0 alone gathers the features, runs the kNN and the k-means
    (on its own GPU) and sends the scores to every rank (an error there is raised on every rank). A bank that
    would not fit ``budget_bytes`` is cut to fit, with a log line: every m-th training image, or for raw pixels
    (``encoder`` None) a pooled image. ``should_stop`` (agreed over ranks) is asked after every batch: when it
    says stop, {} on every rank."""
    from pcl.cluster import kmeans

    bank_loader, bank_labels, test_loader, test_labels = knn_sets
    if encoder is not None:
        dist_utils.broadcast_buffers(encoder)  # one set of BN statistics for every rank's shard
    encode, stride, cut = _monitor_encoder(encoder, len(bank_labels), image_size, budget_bytes)
    stride = coprime_stride(stride, dist_utils.world_size())
    if cut:
        logger.info("kNN monitor: %s, to keep the bank within %.1f GB on rank 0", cut, budget_bytes / 2 ** 30)
    stopped: list[bool] = []

    def stop() -> bool:
        if should_stop():
            stopped.append(True)
        return bool(stopped)

    stop = stop if should_stop is not None else None
    bank = extract_features(encode, bank_loader, device, len(bank_labels), dst=0, stride=stride, should_stop=stop)
    test = None if stopped else extract_features(encode, test_loader, device, len(test_labels), dst=0,
                                                 should_stop=stop)
    if stopped:
        return {}

    def scores() -> dict[str, float]:
        out = {"knn_top1": knn_accuracy(bank, bank_labels[::stride], test, test_labels, k, temperature)}
        if with_nmi:
            num_classes = int(max(bank_labels.max(), test_labels.max())) + 1
            assign = kmeans(test, num_classes, seed=0, niter=20, nredo=1, backend=kmeans_backend)[2]
            out["test_nmi"] = clustering_scores(test_labels.numpy(), assign.cpu().numpy(), with_ami=False)["nmi"]
        return out

    return dist_utils.broadcast_object(dist_utils.main_only(scores, "the kNN monitor"))


def knn_report(encoders: dict[str, nn.Module | None], knn_sets: tuple[Any, torch.Tensor, Any, torch.Tensor],
               device: torch.device, k: int = 20, temperature: float = 0.07, budget_bytes: int = MONITOR_BANK_BYTES,
               image_size: int = 224) -> dict[str, float]:
    """kNN top-1 of each named encoder (None: raw pixels) on the labelled test split, logged and, on rank 0,
    printed as a markdown table."""
    report = {name: monitor_scores(enc, knn_sets, device, k, temperature, with_nmi=False, budget_bytes=budget_bytes,
                                   image_size=image_size)["knn_top1"]
              for name, enc in encoders.items()}
    logger.info("kNN top-1 (k=%d, T=%g) on the test split: %s", k, temperature,
                ", ".join(f"{n} {v:.2f}%" for n, v in report.items()))
    if dist_utils.is_main():
        print("\n| features | kNN top-1 |\n|---|---|")
        for name, acc in report.items():
            print(f"| {name} | {acc:.2f}% |")
    return report


def log_clusters(run_log: RunLog, stats: dict[str, Any], cluster: ClusterResult | None, cfg: RunConfig,
               epoch: int, labels: torch.Tensor | None = None) -> None:
    """E-step timings and cluster statistics into the stats (NMI/AMI per granularity against the training
    labels when the set has them), and everything to TensorBoard (with cluster-size and phi histograms)."""
    if cluster is not None and labels is not None:
        def scores() -> dict[str, float]:
            # rank 0 only, while the others wait: NMI is O(N), AMI is skipped above 200k samples, and the
            # Hungarian accuracy (a dense k x classes table: 0.8 GB at ImageNet's k = 100k) is not computed
            return {f"{m}_k{k_}": v for k_, assign in zip(cfg.num_cluster, cluster.im2cluster)
                    for m, v in clustering_scores(labels.numpy(), assign.cpu().numpy(), with_acc=False).items()}
        stats.update(dist_utils.main_only(scores, "the clustering scores") or {})
    if cluster is not None:
        stats["estep_seconds"] = cluster.estep_seconds
        for k_, sec in zip(cfg.num_cluster, cluster.kmeans_seconds):
            stats[f"kmeans_seconds_k{k_}"] = sec
        sizes = [torch.bincount(a, minlength=len(c)).float() for a, c in zip(cluster.im2cluster, cluster.centroids)]
        for k, s, phi in zip(cfg.num_cluster, sizes, cluster.concentration):
            run_log.scalars(epoch, {f"cluster/k{k}_size_max": s.max().item(),
                                    f"cluster/k{k}_empty": (s == 0).sum().item(),
                                    f"cluster/k{k}_phi_std": phi.std().item()})
            run_log.histogram(f"cluster/k{k}_phi", phi, epoch)
            run_log.histogram(f"cluster/k{k}_sizes", s, epoch)
    run_log.scalars(epoch, {f"train/{k}": v for k, v in stats.items() if k != "epoch"})


def log_galleries(run_log: RunLog, cluster: ClusterResult, data: PretrainData, cfg: RunConfig,
                  epoch: int) -> None:
    """One prototype gallery per granularity into TensorBoard (rank 0): ~80 pictures decoded per granularity."""
    start = time.perf_counter()
    for k, rows in zip(cfg.num_cluster, cluster.gallery):
        run_log.image(f"prototypes/k{k}", render_gallery(rows, data.eval_loader), epoch)
        run_log.text(f"prototypes/k{k}", caption(k, rows), epoch)
    logger.info("prototype galleries: %.2f s", time.perf_counter() - start)
