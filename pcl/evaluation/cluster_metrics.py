"""Clustering quality of frozen features against labels: NMI, AMI and Hungarian cluster accuracy.

The paper reports AMI of k-means on ImageNet features (k = 25k and 1000). The metrics are scikit-learn's NMI
and AMI (arithmetic normalisation, its default) and the cluster accuracy of the best one-to-one matching of
clusters to classes (Hungarian algorithm on the contingency table; clusters left unmatched count as wrong); they
live in :mod:`pcl.features`.

Command (features of the labelled training split, center crops, L2-normalised; faiss k-means with the
pretraining settings):

    python -m pcl.evaluation.cluster_metrics --dataset demo --image-size 32 \\
        --pretrained exp/demo/checkpoint_last.pth.tar --num-cluster 10,20,80
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pcl.config import RunConfig, parse_num_cluster
from pcl.evaluation.common import follow_checkpoint, labelled_features, resolve_eval_dataset
from pcl.features import AMI_MAX_SAMPLES, cluster_accuracy, clustering_scores

__all__ = ["build_parser", "run", "AMI_MAX_SAMPLES", "cluster_accuracy", "clustering_scores"]

logger = logging.getLogger("pcl")


def build_parser() -> argparse.ArgumentParser:
    from pcl.config import eval_command_parser

    p = eval_command_parser("k-means on frozen features: NMI / AMI / cluster accuracy vs labels", spawns=False)
    p.add_argument("--num-cluster", default="", type=str, help="comma-separated k (default: the number of classes)")
    p.add_argument("--kmeans-backend", default="auto", choices=["auto", "faiss", "torch"])
    p.add_argument("--kmeans-niter", default=20, type=int)
    p.add_argument("--kmeans-nredo", default=5, type=int)
    return p


def run(args: Any) -> dict[str, Any]:
    from pcl.cluster import run_kmeans
    from pcl.log import setup_logging, write_json

    cfg = RunConfig.of(args)
    setup_logging(cfg.exp_dir, cfg.debug)
    cfg = follow_checkpoint(cfg)
    feats, labels, _, _ = labelled_features(cfg.replace(dataset=resolve_eval_dataset(cfg)), splits=("train",))
    ks = list(parse_num_cluster(cfg.num_cluster)) if cfg.num_cluster else [int(labels.max()) + 1]
    result = run_kmeans(feats, ks, 0.2, seed=0, niter=cfg.kmeans_niter, nredo=cfg.kmeans_nredo,
                        backend=cfg.kmeans_backend)
    rows = {k: clustering_scores(labels.numpy(), a.cpu().numpy()) for k, a in zip(ks, result.im2cluster)}
    print("\n| k | NMI | AMI | cluster acc |\n|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['nmi']:.2f} | {r.get('ami', float('nan')):.2f} | {r['acc']:.2f} |")
    os.makedirs(cfg.exp_dir, exist_ok=True)
    write_json(os.path.join(cfg.exp_dir, "cluster_metrics.json"),
               {"pretrained": cfg.pretrained, "n": len(labels), "scores": rows})
    return rows


if __name__ == "__main__":
    from pcl.launch import main

    sys.exit(main(build_parser, run, one_process="python -m pcl.evaluation.cluster_metrics"))
