"""Clustering quality of frozen features against labels: NMI, AMI and Hungarian cluster accuracy.

The paper reports AMI of k-means on ImageNet features (k = 25k and 1000). The metrics are scikit-learn's NMI
and AMI (arithmetic normalisation, its default) and the cluster accuracy of the best one-to-one matching of
clusters to classes (Hungarian algorithm on the contingency table; clusters left unmatched count as wrong).

Command (features of the labelled training split, center crops, L2-normalised; faiss k-means with the
pretraining settings):

    python -m pcl.evaluation.cluster_metrics --dataset demo --image-size 32 \\
        --pretrained exp/demo/checkpoint_last.pth.tar --num-cluster 10,20,80
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np


logger = logging.getLogger("pcl")

AMI_MAX_SAMPLES = 200_000  # scikit-learn's expected-MI term grows with N x clusters; skipped above this


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


def build_parser() -> argparse.ArgumentParser:
    from pcl.config import _add_eval_common, _formatter, data_parser, dist_parser, model_parser

    p = argparse.ArgumentParser(description="k-means on frozen features: NMI / AMI / cluster accuracy vs labels",
                                parents=[data_parser(), model_parser(), dist_parser()], formatter_class=_formatter)
    _add_eval_common(p)
    p.add_argument("-b", "--batch-size", default=256, type=int, help="feature-extraction batch")
    p.add_argument("--num-cluster", default="", type=str, help="comma-separated k (default: the number of classes)")
    p.add_argument("--kmeans-backend", default="auto", choices=["auto", "faiss", "torch"])
    p.add_argument("--kmeans-niter", default=20, type=int)
    p.add_argument("--kmeans-nredo", default=5, type=int)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pcl.cluster import run_kmeans
    from pcl.evaluation.knn import labelled_features
    from pcl.log import setup_logging

    setup_logging(args.exp_dir, args.debug)
    feats, labels, _, _ = labelled_features(args, splits=("train",))
    ks = [int(k) for k in args.num_cluster.split(",") if k.strip()] if args.num_cluster else [int(labels.max()) + 1]
    result = run_kmeans(feats, ks, 0.2, seed=0, niter=args.kmeans_niter, nredo=args.kmeans_nredo,
                        backend=args.kmeans_backend)
    rows = {k: clustering_scores(labels.numpy(), a.cpu().numpy()) for k, a in zip(ks, result.im2cluster)}
    print("\n| k | NMI | AMI | cluster acc |\n|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['nmi']:.2f} | {r.get('ami', float('nan')):.2f} | {r['acc']:.2f} |")
    os.makedirs(args.exp_dir, exist_ok=True)
    with open(os.path.join(args.exp_dir, "cluster_metrics.json"), "w") as f:
        json.dump({"pretrained": args.pretrained, "n": len(labels), "scores": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    from pcl.launch import main

    sys.exit(main(build_parser, run, one_process="python -m pcl.evaluation.cluster_metrics"))
