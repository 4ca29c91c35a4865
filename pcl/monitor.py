"""What pretraining observes, and only observes: the E-step's cluster statistics and timings, the prototype
galleries, the kNN/NMI monitor on the labelled test split (within a memory budget on rank 0), and the final kNN
report. Every rank calls the same methods (the monitor's feature passes are collectives); rank 0 writes."""

from __future__ import annotations

import logging
import math
import os
import shlex
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcl import distributed as dist_utils
from pcl.checkpoint import query_backbone
from pcl.cluster import ClusterResult
from pcl.data import PretrainData
from pcl.data.registry import DIR_DATASET, spec
from pcl.estep import EStep
from pcl.features import AMI_MAX_SAMPLES, clustering_scores, extract_features, knn_accuracy, nmi
from pcl.gallery import GalleryRow, caption, gallery_rows, render_gallery
from pcl.log import RunLog
from pcl.preemption import StopRequest
from pcl.settings import MonitorSettings

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
    return encoder, stride, f"one training image in {stride} in the bank" if stride > 1 else ""


def next_commands(s: MonitorSettings, checkpoint: str, labelled: bool = True) -> list[str]:
    """The evaluations to run next, complete and runnable as printed: this run's data (``--dataset demo``, the real
    DIR, --class-list), image size and checkpoint, and the linear preset next to the run's ``-c`` preset
    (``configs/demo.yaml`` -> ``configs/demo_linear.yaml``) when there is one. Images without labels (a flat
    folder, --unlabelled) have nothing to score: the galleries and the export instead."""
    q = shlex.quote
    entry = spec(s.dataset)
    data = f"--dataset {s.dataset}" if not entry.takes_dir else q(str(s.data)) if s.dataset == DIR_DATASET \
        else f"--dataset {s.dataset} {q(str(s.data))}"
    data += f" --demo-renders {s.demo_renders}" if s.dataset == "demo" and s.demo_renders != 4 else ""
    data += f" --class-list {q(s.class_list)}" if s.class_list else ""
    data += " --bad-images skip" if s.bad_images == "skip" else ""
    common = f"{data} --image-size {s.image_size} --pretrained {q(checkpoint)}"
    if not labelled:
        out = os.path.join(os.path.dirname(checkpoint), "visualize")
        flag = " --unlabelled" if s.unlabelled else ""
        return [f"python -m pcl.evaluation.visualize {common}{flag} --exp-dir {q(out)}",
                f"python -m pcl.export {q(checkpoint)} backbone.pth"]
    stem, ext = os.path.splitext(s.config or "")
    linear = f"-c {q(stem + '_linear' + ext)} " if s.config and os.path.isfile(stem + "_linear" + ext) else ""
    return [f"python eval_linear.py {linear}{common}", f"python -m pcl.evaluation.knn {common}"]


def coprime_stride(stride: int, world: int) -> int:
    """The smallest stride >= ``stride`` sharing no factor with the number of ranks: shards are round-robin (rank r
    holds r, r + W, ...), so with a common factor g only 1/g of the ranks would keep rows and the gathered buffer,
    padded to the largest shard, would be g times the planned bank."""
    while math.gcd(stride, world) != 1:
        stride += 1
    return stride


def _bank_plan(encoder: nn.Module | None, num_rows: int, image_size: int, budget_bytes: int
               ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, int, str, int]:
    """(encoder, bank stride over this many ranks, what was cut, rows kept) for one monitor pass."""
    encode, stride, cut = _monitor_encoder(encoder, num_rows, image_size, budget_bytes)
    stride = coprime_stride(stride, dist_utils.world_size())
    return encode, stride, cut, len(range(0, num_rows, stride))


def bank_rows(encoder: nn.Module | None, num_rows: int, image_size: int, budget_bytes: int) -> int:
    """The training images :func:`monitor_scores` keeps in the kNN bank of ``encoder`` (all of them unless the bank
    is cut to fit ``budget_bytes``)."""
    return _bank_plan(encoder, num_rows, image_size, budget_bytes)[3]


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
    encode, stride, cut, rows = _bank_plan(encoder, len(bank_labels), image_size, budget_bytes)
    if cut:
        logger.info("kNN monitor: %s, to keep the bank within %.1f GB on rank 0%s", cut, budget_bytes / 2 ** 30,
                    f"; its {rows} images are fewer than --knn-k {k}: all of them vote" if k > rows else "")
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
    used = {name: min(k, bank_rows(enc, len(knn_sets[1]), image_size, budget_bytes)) for name, enc in encoders.items()}
    # what knn_predict used: every image of the bank votes when k exceeds them (a bank cut to the budget is smaller)
    same = len(set(used.values())) == 1
    scores = ", ".join(f"{n} {v:.2f}%" + ("" if same else f" (k={used[n]})") for n, v in report.items())
    logger.info("kNN top-1 (%sT=%g) on the test split: %s", f"k={next(iter(used.values()))}, " if same else "",
                temperature, scores)
    if dist_utils.is_main():
        print("\n| features | kNN top-1 |\n|---|---|")
        for name, acc in report.items():
            print(f"| {name} | {acc:.2f}% |")
    return report


class Monitor:
    """What pretraining observes of its epochs. Every rank calls each method at the same point (the kNN monitor's
    feature passes and the rank-0 work are collectives); rank 0 writes TensorBoard, train.log and the galleries."""

    def __init__(self, settings: MonitorSettings, run_log: RunLog, data: PretrainData, device: torch.device,
                 stop: StopRequest, resumed_from: str | None = None) -> None:
        """``resumed_from``: the checkpoint this run continues; its first line in log.txt names it."""
        self.settings, self.run_log, self.data, self.device, self.stop = settings, run_log, data, device, stop
        self.resumed_from = resumed_from
        self.estep: dict[str, float] = {}  # the last E-step's timings, logged with its epoch
        self.gallery: list[list[GalleryRow]] = []  # per granularity, rank 0
        self.since = time.perf_counter()
        self.input_checked = False
        self.previous: list[torch.Tensor] | None = None  # rank 0: the last E-step's assignments, per granularity
        if data.knn is not None and settings.knn_k > len(data.knn[1]):
            logger.warning("--knn-k %d is more than the %d training images of the kNN monitor: every image votes "
                           "(k = %d is what its scores use); pass --knn-k %d or less to silence this",
                           settings.knn_k, len(data.knn[1]), len(data.knn[1]), len(data.knn[1]))

    def e_step(self, epoch: int, estep: EStep) -> ClusterResult:
        """Note an E-step (its timings; its gallery rows while rank 0 still holds the features, which are then
        dropped) and hand on its prototypes."""
        s, clusters = self.settings, estep.clusters
        if s.prototype_gallery:  # rank 0: O(N) + the shown clusters' rows
            self.gallery = dist_utils.main_only(lambda: [
                gallery_rows(estep.features, a, c, phi, seed=s.seed)
                for a, c, phi in zip(clusters.im2cluster, clusters.centroids, clusters.concentration)],
                "the gallery") or []
        estep.features = None
        self.estep = {"estep_seconds": estep.seconds, "estep_feature_seconds": estep.feature_seconds,
                      **{f"kmeans_seconds_k{k}": sec for k, sec in zip(s.num_cluster, estep.kmeans_seconds)},
                      **{f"kmeans_obj_k{k}": obj for k, obj in zip(s.num_cluster, clusters.objective)},
                      **estep.warm_check, **self._drift(clusters),
                      **({"estep_filled": estep.filled} if estep.filled else {}),
                      **({"kmeans_seed": estep.seed} if s.kmeans_reseed else {})}
        sizes = [torch.bincount(a, minlength=len(c)) for a, c in zip(clusters.im2cluster, clusters.centroids)]
        logger.info("E-step epoch %d: %s; features %.1f s%s, k-means%s %s s, total %.1f s%s", epoch,
                    ", ".join(f"k={k} (largest {int(z.max())}, {int((z == 0).sum())} empty)"
                              for k, z in zip(s.num_cluster, sizes)), estep.feature_seconds,
                    f" ({estep.filled} rows encoded for the bank)" if estep.filled else "",
                    " (warm start)" if estep.warm else "", "/".join(f"{sec:.1f}" for sec in estep.kmeans_seconds),
                    estep.seconds, "; warm vs cold start: NMI " + "/".join(
                        f"{v:.1f}" for key, v in estep.warm_check.items() if key.startswith("nmi_")) + " %"
                    if estep.warm_check else "")
        whole = [k for k, z in zip(s.num_cluster, sizes) if int(z.max()) == int(z.sum())]
        if whole:  # k-means found no two distinct points: every prototype is one and ProtoNCE carries no signal
            logger.warning("E-step epoch %d: k=%s put every sample in one cluster: the features have collapsed "
                           "(identical images, or an encoder that maps every image to one point); the prototypes "
                           "carry no signal", epoch, ",".join(map(str, whole)))
        return clusters

    def epoch_end(self, epoch: int, model: nn.Module, clusters: ClusterResult | None, stats: dict[str, Any],
                  lr: float) -> dict[str, Any]:
        """The epoch's stats with what was observed: lr, wall seconds (since the previous epoch's stats),
        the E-step's timings and cluster statistics (NMI/AMI against the training labels where the set has them;
        size and phi histograms), the galleries, and every --knn-every epochs the kNN/NMI monitor (left out when a
        stop request came during it)."""
        s, epoch_stats = self.settings, {**stats, "epoch": epoch, "lr": lr,
                                         "seconds": time.perf_counter() - self.since}
        self._check_input(epoch, epoch_stats)
        if clusters is not None:
            epoch_stats.update(self._cluster_scores(clusters))
            epoch_stats.update(self.estep)
            self._cluster_histograms(epoch, clusters)
        self.run_log.scalars(epoch, {f"train/{k}": v for k, v in epoch_stats.items() if k != "epoch"})
        if clusters is not None and s.prototype_gallery:
            dist_utils.main_only(lambda: self.run_log.writer is not None and self.gallery
                                 and self._log_galleries(epoch), "the prototype galleries")
        if s.knn_every and self.data.knn is not None and ((epoch + 1) % s.knn_every == 0 or epoch + 1 == s.epochs):
            scores = monitor_scores(query_backbone(model), self.data.knn, self.device, s.knn_k, s.knn_t,
                                    kmeans_backend=s.kmeans_backend, should_stop=lambda: self.stop.poll(self.device),
                                    budget_bytes=s.knn_budget_bytes, image_size=s.image_size)
            epoch_stats.update(scores)
            self.run_log.scalars(epoch, {f"train/{k}": v for k, v in scores.items()})
        return epoch_stats

    def record(self, stats: dict[str, Any]) -> None:
        """The epoch's line in log.txt and train.log (rank 0) and the console; the first after a resume names the
        checkpoint it continued (so a restart is marked where log.txt repeats epochs)."""
        self.run_log.record({**stats, "resumed_from": self.resumed_from} if self.resumed_from else stats)
        self.resumed_from = None
        logger.info("epoch %d: %s", stats["epoch"], " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch"))
        self.since = time.perf_counter()

    def finished(self, last_checkpoint: str) -> None:
        """The run's last line: where its weights are, the epoch convention, and what to run next."""
        epoch = self.settings.epochs - 1
        logger.info("finished %d epochs (counted from 0): %s holds the weights after epoch %d (its 'epoch' entry, "
                    "%d, is where --resume continues). Next: %s", self.settings.epochs, last_checkpoint, epoch,
                    epoch + 1, "; ".join(next_commands(self.settings, last_checkpoint, self.data.labelled)))

    def final_report(self, model: nn.Module, random_init: Callable[[], nn.Module]) -> dict[str, float]:
        """With --knn-eval: kNN top-1 on the labelled test split of the learned backbone, a random-init one (built by
        ``random_init``) and raw pixels; {} otherwise."""
        s = self.settings
        if not s.knn_eval or self.data.knn is None:
            return {}
        torch.manual_seed(s.seed)  # the random-init baseline
        encoders = {"learned": query_backbone(model), "random_init": random_init().to(self.device).eval(),
                    "raw_pixels": None}
        return knn_report(encoders, self.data.knn, self.device, s.knn_k, s.knn_t, budget_bytes=s.knn_budget_bytes,
                          image_size=s.image_size)

    INPUT_BOUND = 0.3  # warn when the M-step waited this share of its time for batches

    def _check_input(self, epoch: int, stats: dict[str, Any]) -> None:
        """Once per run, after its first epoch: say when the loader, not the model, bounds the run."""
        if self.input_checked or "input_wait" not in stats:
            return
        self.input_checked = True
        wait = stats["input_wait"]
        if wait > self.INPUT_BOUND:
            logger.warning("the input pipeline bounds this run: the training steps waited %.0f%% of epoch %d for "
                           "batches. Give the loader more workers (-j/--workers is per node and shared by its "
                           "processes; the official 32 is 4 per GPU on 8 GPUs), or move the augmentation to the GPU "
                           "(--augment device)", 100 * wait, epoch)
        else:
            logger.info("input pipeline: the training steps waited %.0f%% of epoch %d for batches", 100 * wait, epoch)

    def _drift(self, clusters: ClusterResult) -> dict[str, float]:
        """How far the prototypes moved since the previous E-step of this run: per granularity the NMI (percent)
        between the two assignments of the training set (100: the same partition; the freeze diagnostic). Rank 0,
        on its device (:func:`pcl.features.nmi`: 0.16 s at N = 1.28M, k = 100k on this repo's 2-core CPU, where
        scikit-learn takes 2.5 s); nothing at a run's first E-step."""
        def drift() -> dict[str, float]:
            now = [a.clone() for a in clusters.im2cluster]
            out = {} if self.previous is None else {
                f"drift_nmi_k{k}": nmi(before, after)
                for k, before, after in zip(self.settings.num_cluster, self.previous, now)}
            self.previous = now
            return out
        return dist_utils.main_only(drift, "the prototype drift") or {}

    def _cluster_scores(self, clusters: ClusterResult) -> dict[str, float]:
        labels = self.data.knn[1] if self.data.knn is not None else None
        if labels is None:
            return {}

        def scores() -> dict[str, float]:
            # rank 0 only, while the others wait: NMI is O(N), AMI is skipped above 200k samples (there the NMI is
            # computed on the device: seconds per granularity in scikit-learn), and the Hungarian accuracy (a dense
            # k x classes table: 0.8 GB at ImageNet's k = 100k) is not computed
            if len(labels) > AMI_MAX_SAMPLES:
                return {f"nmi_k{k}": nmi(labels.to(assign.device), assign)
                        for k, assign in zip(self.settings.num_cluster, clusters.im2cluster)}
            return {f"{m}_k{k}": v for k, assign in zip(self.settings.num_cluster, clusters.im2cluster)
                    for m, v in clustering_scores(labels.numpy(), assign.cpu().numpy(), with_acc=False).items()}
        return dist_utils.main_only(scores, "the clustering scores") or {}

    def _cluster_histograms(self, epoch: int, clusters: ClusterResult) -> None:
        for k, assign, cents, phi in zip(self.settings.num_cluster, clusters.im2cluster, clusters.centroids,
                                         clusters.concentration):
            sizes = torch.bincount(assign, minlength=len(cents)).float()
            self.run_log.scalars(epoch, {f"cluster/k{k}_size_max": sizes.max().item(),
                                         f"cluster/k{k}_empty": (sizes == 0).sum().item(),
                                         f"cluster/k{k}_phi_std": phi.std().item()})
            self.run_log.histogram(f"cluster/k{k}_phi", phi, epoch)
            self.run_log.histogram(f"cluster/k{k}_sizes", sizes, epoch)

    def _log_galleries(self, epoch: int) -> None:
        """One prototype gallery per granularity into TensorBoard (rank 0): ~80 pictures decoded per granularity."""
        start = time.perf_counter()
        for k, rows in zip(self.settings.num_cluster, self.gallery):
            self.run_log.image(f"prototypes/k{k}", render_gallery(rows, self.data.eval_loader), epoch)
            self.run_log.text(f"prototypes/k{k}", caption(k, rows), epoch)
        logger.debug("prototype galleries: %.2f s", time.perf_counter() - start)
