"""What a frozen encoder's features score: the one feature extractor, weighted kNN, clustering scores (NMI, AMI,
Hungarian accuracy), and the pretraining's kNN/NMI monitor. The training loop may import this module; it
imports no command line and no protocol.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pcl import distributed as dist_utils

logger = logging.getLogger("pcl")

AMI_MAX_SAMPLES = 200_000  # scikit-learn's expected-MI term grows with N x clusters; skipped above this


@torch.no_grad()
def extract_features(encoder: Callable[[torch.Tensor], torch.Tensor] | None, loader, device: torch.device,
                     num_samples: int, normalize: bool = True, progress: bool = False, desc: str = "features",
                     should_stop: Callable[[], bool] | None = None, dst: int | None = None,
                     stride: int = 1) -> torch.Tensor | None:
    """Features of every sample, N x d in dataset order, each computed once by one rank and gathered exactly.

    ``loader`` yields ``(images, index)`` or ``(images, labels, index)``; ``encoder`` maps images to rows
    (None: the flattened pixels, the raw-pixel baseline); ``normalize`` L2-normalises each row. With one process
    every batch is written straight into the result (one copy of it); with several, a rank's own rows plus the
    gathered buffer (see ``gather_rows_exact``), on every rank (``dst`` None) or on rank ``dst`` only (None on the
    others). ``should_stop()`` is asked after every batch: True -> None (on every rank: it must agree over ranks).
    ``stride`` m > 1 keeps samples 0, m, 2m, ... only: ceil(N / m) rows (a bank cut to fit, see ``bank_stride``).

    Ranks' shards may differ by a batch (N not a multiple of world x batch): every rank then runs as many
    iterations as the largest shard, asking ``should_stop`` at each, so all issue the same collectives.
    """
    out, rows, idx = None, [], []
    num_samples = -(-num_samples // stride)
    distributed = dist_utils.is_dist()
    steps = dist_utils.max_over_ranks(len(loader), device) if distributed and should_stop is not None else len(loader)
    batches = iter(loader)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        batch = next(batches, None)  # None: this rank's shard is done, the others' are not
        if batch is not None:
            images, index = batch[0].to(device, non_blocking=True), torch.as_tensor(batch[-1]).to(device)
            feats = (images if encoder is None else encoder(images)).float().flatten(1)
            if normalize:
                feats = F.normalize(feats, dim=1)
            if stride > 1:
                keep = index % stride == 0
                feats, index = feats[keep], index[keep] // stride
            if distributed:
                rows.append(feats)
                idx.append(index)
            else:
                if out is None:
                    out = torch.zeros(num_samples, feats.shape[1], device=device)
                out[index] = feats
        if should_stop is not None and should_stop():
            return None
    if distributed:  # an empty shard (fewer samples than ranks) sends no rows, through the same collectives
        empty = (torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device))
        return dist_utils.gather_rows_exact(torch.cat(rows) if rows else empty[0], torch.cat(idx) if idx else empty[1],
                                            num_samples, dst)
    return out


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Class scores of each test sample: sum over its k nearest (cosine) training samples of
    exp(sim / T) one-hot(label). train_features: N x d, test_features: M x d (unit rows) -> M x C."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    chunk = max(1, min(chunk, (1 << 28) // max(train_features.shape[0], 1)))  # m x N similarities: <= 1 GB
    scores = []
    for s in range(0, test_features.shape[0], chunk):
        sim = test_features[s:s + chunk] @ train_features.t()  # m x N
        top_sim, top_idx = sim.topk(k, dim=1)  # m x k
        weights = (top_sim / temperature).exp()
        onehot = F.one_hot(train_labels[top_idx], num_classes).to(weights.dtype)  # m x k x C
        scores.append((onehot * weights[..., None]).sum(dim=1))
    return torch.cat(scores)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (percent) of the weighted kNN classifier."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_features, train_labels.to(train_features.device), test_features, k, temperature,
                       num_classes).argmax(dim=1)
    return (pred.cpu() == test_labels.cpu()).float().mean().item() * 100.0


def cluster_accuracy(labels: Sequence[int] | np.ndarray, assignments: Sequence[int] | np.ndarray) -> float:
    """Percent of samples whose cluster maps to their class under the best one-to-one cluster-class matching."""
    from scipy.optimize import linear_sum_assignment

    labels, assignments = np.asarray(labels), np.asarray(assignments)
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(assignments, return_inverse=True)
    table = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)  # clusters x classes
    np.add.at(table, (c, y), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(labels) * 100.0)


def clustering_scores(labels: Sequence[int] | np.ndarray, assignments: Sequence[int] | np.ndarray,
                      with_ami: bool | None = None, with_acc: bool = True) -> dict[str, float]:
    """{'nmi', 'ami', 'acc'} in percent (AMI omitted for more than AMI_MAX_SAMPLES samples unless asked; the
    Hungarian accuracy only with ``with_acc``: its dense clusters x classes table is 0.8 GB at k = 100k)."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    labels, assignments = np.asarray(labels), np.asarray(assignments)
    out = {"nmi": float(normalized_mutual_info_score(labels, assignments) * 100)}
    if with_ami or (with_ami is None and len(labels) <= AMI_MAX_SAMPLES):
        out["ami"] = float(adjusted_mutual_info_score(labels, assignments) * 100)
    if with_acc:
        out["acc"] = cluster_accuracy(labels, assignments)
    return out


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
