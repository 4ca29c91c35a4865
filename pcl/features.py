"""The one feature pass (shared by the E-step, the pretraining monitor and every evaluation) and what features
score: weighted kNN and clustering scores (NMI, AMI, Hungarian accuracy). Pure of settings: it imports no
command line and no protocol."""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pcl import PCLError, distributed as dist_utils

logger = logging.getLogger("pcl")

AMI_MAX_SAMPLES = 200_000  # scikit-learn's expected-MI term grows with N x clusters; skipped above this


def _encoded_batches(encoder: Callable[[torch.Tensor], torch.Tensor] | None, loader, device: torch.device,
                     normalize: bool, progress: bool, desc: str, should_stop: Callable[[], bool] | None,
                     stride: int, stopped: list[bool]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(rows B x d, their dataset indices B) of this rank's batches; ``stopped`` gets True when ``should_stop``
    said so (then the iteration ends early, on every rank alike). Ranks' shards may differ by a batch: with
    ``should_stop`` every rank runs as many iterations as the largest shard, so all issue the same collectives."""
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
            yield feats, index
        if should_stop is not None and should_stop():
            stopped.append(True)
            return


@torch.no_grad()
def shard_features(encoder: Callable[[torch.Tensor], torch.Tensor] | None, loader, device: torch.device,
                   dim: int, normalize: bool = True, progress: bool = False, desc: str = "features",
                   should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """This rank's features and their dataset indices (n_r x ``dim``, n_r), nothing gathered: for work that runs
    on every rank's own rows (the E-step's k-means across ranks). None when ``should_stop`` said so."""
    stopped: list[bool] = []
    rows, idx = [], []
    for feats, index in _encoded_batches(encoder, loader, device, normalize, progress, desc, should_stop, 1, stopped):
        rows.append(feats)
        idx.append(index)
    if stopped:
        return None
    if not rows:  # fewer samples than ranks
        return torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(rows), torch.cat(idx)


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
    """
    out, rows, idx, stopped = None, [], [], []
    num_samples = -(-num_samples // stride)
    distributed = dist_utils.is_dist()
    for feats, index in _encoded_batches(encoder, loader, device, normalize, progress, desc, should_stop, stride,
                                         stopped):
        if distributed:
            rows.append(feats)
            idx.append(index)
        else:
            if out is None:
                out = torch.zeros(num_samples, feats.shape[1], device=device)
            out[index] = feats
    if stopped:
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
    exp((sim - s_max) / T) one-hot(label), s_max the sample's largest similarity: the official exp(sim / T) times a
    factor per test sample (the arg-max is the same), finite at any T (exp(1 / 1e-9) overflows to inf, inf / inf
    votes are NaN). train_features: N x d, test_features: M x d (unit rows) -> M x C."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    chunk = max(1, min(chunk, (1 << 28) // max(train_features.shape[0], 1)))  # m x N similarities: <= 1 GB
    scores = []
    for s in range(0, test_features.shape[0], chunk):
        sim = test_features[s:s + chunk] @ train_features.t()  # m x N
        top_sim, top_idx = sim.topk(k, dim=1)  # m x k
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # topk is sorted: column 0 is the largest
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


@torch.no_grad()
def nmi(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised mutual information (percent) of two labelings of the same N samples, on their device: the
    contingency table from the distinct (a, b) pairs (a sort of N int64 codes, no dense k_a x k_b table), MI over
    its nonzero cells, normalised by the arithmetic mean of the two entropies (scikit-learn's default), float64.
    100 for two equal partitions (whatever the names); 100 too when both are a single cluster. a, b: N int."""
    a, b = a.reshape(-1).long(), b.reshape(-1).long()
    n = a.numel()
    _, a = torch.unique(a, return_inverse=True)  # 0..k_a-1
    _, b = torch.unique(b, return_inverse=True)
    count_a = torch.bincount(a).double()  # k_a
    count_b = torch.bincount(b).double()  # k_b
    pairs, count_ab = torch.unique(a * count_b.numel() + b, return_counts=True)  # nonzero cells
    if pairs.numel() == count_a.numel() == count_b.numel():  # the same partition, renamed: exactly 100
        return 100.0
    count_ab = count_ab.double()
    ia, ib = pairs // count_b.numel(), pairs % count_b.numel()
    mi = (count_ab / n * (torch.log(count_ab * n) - torch.log(count_a[ia] * count_b[ib]))).sum()
    h_a = -(count_a / n * torch.log(count_a / n)).sum()
    h_b = -(count_b / n * torch.log(count_b / n)).sum()
    mean_h = (h_a + h_b) / 2
    return float((mi.clamp_min(0) / mean_h).clamp(max=1.0)) * 100.0


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


class FeatureBank:
    """The E-step's features taken from the M-step (``--estep-features bank``, after DeepCluster-v2's memory bank):
    row i is the L2-normalised momentum key of sample i from the last training step that saw it; every rank holds
    the whole N x d bank (4 N d bytes: 655 MB at ImageNet's N = 1.28M, d = 128). :meth:`write` is the one call the
    training step makes. Rows no step has written yet (a fresh run, a sample every epoch's sampler dropped) are
    :meth:`missing`; the E-step fills them with a feature pass over those samples only (:meth:`fill`)."""

    def __init__(self, num_samples: int, dim: int, device: torch.device | str, views: str = "pair") -> None:
        if views not in ("pair", "key"):
            raise PCLError(f"--bank-views {views}: use pair or key")
        self.views = views  # pair: the mean of a sample's key and query (its two views); key: the key alone
        self.features = torch.zeros(num_samples, dim, device=device)  # N x d
        self.written = torch.zeros(num_samples, dtype=torch.bool, device=device)  # N

    @torch.no_grad()
    def write(self, keys: torch.Tensor, index: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """``keys``: B_global x d, the step's keys of every rank in rank order (what the queue received, already
        gathered); ``index``: this rank's B sample indices; ``queries``: this rank's B x d queries (the other view,
        needed with views "pair"). Gathered here: one all-gather of B integers (and one of B x d queries), the
        same on every rank. A pair row is the normalised mean of the key and the query: one augmented view is a
        noisy embedding of its sample, two are less noisy (measured: docs/results/estep-cost.md)."""
        index = dist_utils.all_gather_cat(index.to(self.features.device, torch.long))  # B_global
        rows = keys.to(self.features.dtype)
        if self.views == "pair":
            rows = F.normalize(rows + dist_utils.all_gather_cat(queries.detach().to(rows.dtype)), dim=1)
        self.features.index_copy_(0, index, rows)
        self.written[index] = True

    def missing(self) -> torch.Tensor:
        """The indices of the rows never written (long M, the same on every rank; one host sync)."""
        return (~self.written).nonzero().flatten()

    @torch.no_grad()
    def fill(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Write feature-pass rows (M x d, already normalised) at ``index`` (M), the same on every rank."""
        self.features[index] = rows.to(self.features.dtype)
        self.written[index] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"features": self.features.cpu(), "written": self.written.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
        """Restore a saved bank; a shape other than this run's N x d is an error naming ``where``."""
        features, written = state["features"], state["written"]
        if tuple(features.shape) != tuple(self.features.shape) or tuple(written.shape) != tuple(self.written.shape):
            raise PCLError(f"{where} holds an E-step bank of {tuple(features.shape)} rows x dims, this run needs "
                           f"{tuple(self.features.shape)} (another training set or --low-dim): resume on the same "
                           f"data and settings, or start this run fresh")
        self.features.copy_(features)
        self.written.copy_(written)
