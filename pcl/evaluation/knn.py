"""Weighted kNN classification on frozen features (InstDisc, Wu et al. 2018; DINO's monitor)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcl import distributed as dist_utils


@torch.no_grad()
def extract_features(encoder: nn.Module | None, loader, device: torch.device, num_samples: int) -> torch.Tensor:
    """L2-normalised features of every sample, N x d, gathered exactly over ranks. ``encoder=None``
    takes the flattened input pixels (the raw-pixel baseline)."""
    rows, idx = [], []
    for images, index in loader:
        images = images.to(device, non_blocking=True)
        out = images.flatten(1) if encoder is None else encoder(images)
        rows.append(F.normalize(out.float().flatten(1), dim=1))
        idx.append(index.to(device))
    return dist_utils.gather_rows_exact(torch.cat(rows), torch.cat(idx), num_samples)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Class scores of each test sample: sum over its k nearest (cosine) training samples of
    exp(sim / T) one-hot(label). train_features: N x d, test_features: M x d (unit rows) -> M x C."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
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
