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


# ----------------------------------------------------------------------------------------------------
# command: python -m pcl.evaluation.knn --pretrained CKPT [DIR | --dataset demo]
# ----------------------------------------------------------------------------------------------------
def labelled_features(args, splits=("train", "val")):
    """L2-normalised frozen features and labels of the labelled train (and val) split of ``args.dataset``:
    (train_feats, train_labels, val_feats, val_labels); the backbone comes from --pretrained (or random init)."""
    from pcl.data import build_labelled_data
    from pcl.evaluation.svm import _backbone

    from pcl.evaluation.linear import resolve_eval_dataset

    device = dist_utils.init(args)
    resolve_eval_dataset(args)
    backbone = _backbone(args, device)  # cheap input first: a bad --pretrained fails before the dataset is scanned
    data = build_labelled_data(args)
    out = []
    for split in ("train", "val"):
        if split not in splits:
            out += [None, None]
            continue
        loader, labels = ((data.train_eval_loader, data.train_labels) if split == "train"
                          else (data.val_loader, data.val_labels))
        rows, idx = [], []
        with torch.no_grad():
            for images, _, index in loader:
                rows.append(F.normalize(backbone(images.to(device)).float(), dim=1))
                idx.append(torch.as_tensor(index).to(device))
        out += [dist_utils.gather_rows_exact(torch.cat(rows), torch.cat(idx), len(labels)).cpu(), labels.cpu()]
    return tuple(out)


def build_parser():
    import argparse

    from pcl.config import _add_eval_common, _formatter, data_parser, dist_parser, model_parser

    p = argparse.ArgumentParser(description="Weighted kNN (cosine, T=0.07) on frozen features, k = 10, 20, 200",
                                parents=[data_parser(), model_parser(), dist_parser()], formatter_class=_formatter)
    _add_eval_common(p)
    p.add_argument("-b", "--batch-size", default=256, type=int, help="feature-extraction batch")
    p.add_argument("--knn-k", default="10,20,200", type=str, help="comma-separated neighbour counts")
    p.add_argument("--knn-t", default=0.07, type=float, help="temperature of the weighted vote")
    return p


def run(args) -> dict[int, float]:
    import json
    import os

    from pcl.log import setup_logging

    setup_logging(args.exp_dir, args.debug)
    train, train_labels, val, val_labels = labelled_features(args)
    ks = [int(k) for k in str(args.knn_k).split(",") if k.strip()]
    result = {k: knn_accuracy(train, train_labels, val, val_labels, k, args.knn_t) for k in ks}
    print("\n| k | kNN top-1 |\n|---|---|")
    for k, acc in result.items():
        print(f"| {k} | {acc:.2f}% |")
    os.makedirs(args.exp_dir, exist_ok=True)
    with open(os.path.join(args.exp_dir, "knn.json"), "w") as f:
        json.dump({"pretrained": args.pretrained, "t": args.knn_t, "top1": result}, f, indent=1)
    return result


if __name__ == "__main__":
    import sys

    from pcl.launch import main

    sys.exit(main(build_parser, run, one_process="python -m pcl.evaluation.knn"))
