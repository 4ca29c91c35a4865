"""Weighted kNN classification on frozen features (InstDisc, Wu et al. 2018; DINO's monitor).

    python -m pcl.evaluation.knn --pretrained CKPT [DIR | --dataset demo]

The math (:func:`knn_predict`, :func:`knn_accuracy`) lives in :mod:`pcl.features`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pcl.config import RunConfig, parse_list
from pcl.evaluation.common import follow_checkpoint, labelled_features, resolve_eval_dataset
from pcl.features import extract_features, knn_accuracy, knn_predict

__all__ = ["build_parser", "run", "extract_features", "knn_accuracy", "knn_predict"]


def build_parser() -> argparse.ArgumentParser:
    from pcl.config import eval_command_parser

    p = eval_command_parser("Weighted kNN (cosine, T=0.07) on frozen features, k = 10, 20, 200", spawns=False)
    p.add_argument("--knn-k", default="10,20,200", type=str, help="comma-separated neighbour counts")
    p.add_argument("--knn-t", default=0.07, type=float, help="temperature of the weighted vote")
    return p


def run(args: Any) -> dict[int, float]:
    from pcl.log import setup_logging, write_json

    cfg = RunConfig.of(args)
    setup_logging(cfg.exp_dir, cfg.debug)
    cfg = follow_checkpoint(cfg)
    ks = parse_list(cfg.knn_k, "--knn-k", int, "10,20,200", lambda k: k >= 1, " is malformed: every k must be >= 1")
    train, train_labels, val, val_labels = labelled_features(cfg.replace(dataset=resolve_eval_dataset(cfg)))
    n = train.shape[0]
    if max(ks) > n:  # the vote can take at most every training sample: say so rather than print the k asked for
        logging.getLogger("pcl").warning("--knn-k %s: k above the %d training samples votes with all %d",
                                         ",".join(str(k) for k in ks if k > n), n, n)
    result = {k: knn_accuracy(train, train_labels, val, val_labels, k, cfg.knn_t) for k in ks}
    print("\n| k | kNN top-1 |\n|---|---|")
    for k, acc in result.items():
        print(f"| {k if k <= n else f'{k} (all {n})'} | {acc:.2f}% |")
    os.makedirs(cfg.exp_dir, exist_ok=True)
    write_json(os.path.join(cfg.exp_dir, "knn.json"), {"pretrained": cfg.pretrained, "t": cfg.knn_t, "top1": result,
                                                       "k_used": {k: min(k, n) for k in ks}})
    return result


if __name__ == "__main__":
    from pcl.launch import main

    sys.exit(main(build_parser, run, one_process="python -m pcl.evaluation.knn"))
