"""Linear SVMs on frozen features: VOC07 classification mAP, full and low-shot (the paper's Table 1).

Faithful to the official ``eval_svm_voc.py``: features from the frozen backbone on Resize(256) +
CenterCrop(224), divided by (L2 norm + 1e-5); one ``LinearSVC`` per class (C from ``--cost``,
``class_weight={1: 2, -1: 1}``, squared hinge, dual, tol 1e-4, max_iter 2000); label 0 (difficult) counts
as negative in training and test; AP as the official ``get_precision_recall``/``calculate_ap``; for each k,
the best cost's mean over runs is reported. Low-shot sampling follows the official ``convert_low_shot``: for
each class, k images among its positives, concatenated over classes (an image drawn for two classes appears
twice), each with its full label row.

What differs (documented in docs/faithfulness.md): features are extracted once per split (the official re-extracts the
training set for every k, run and cost); the runs of k are seeded by (seed, k, run) with numpy's Generator
rather than a shared ``random`` stream; SVMs for different classes run in parallel (joblib).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from pcl import distributed as dist_utils
from pcl.config import RunConfig, parse_list
from pcl.settings import DistSettings
from pcl.data.datasets import data_settings
from pcl.data.registry import spec
from pcl.data.transfer import svm_loader, svm_sets
from pcl.evaluation.common import eval_backbone, follow_checkpoint
from pcl.features import extract_features
from pcl.log import setup_logging, write_atomic, write_json

logger = logging.getLogger("pcl")


# ----------------------------------------------------------------------------------------------------
# pure parts
# ----------------------------------------------------------------------------------------------------
def average_precision(scores: Sequence[float] | np.ndarray, targets: Sequence[float] | np.ndarray) -> float:
    """VOC07 classification AP (a fraction in [0, 1]) as the official ``eval_svm_voc.py`` computes it.

    scores: N decision values; targets: N labels, > 0 counts as positive (so -1 and 0 are negatives).
    Samples are ranked by ``np.argsort(scores)[::-1]`` (the official order, ties included); precision is made
    monotone from the right and integrated over the recall steps. A class with no positive has no AP: 0.0 is
    returned (no NaN).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = (np.asarray(targets).reshape(-1) > 0).astype(np.float64)
    num_pos = positive.sum()
    if num_pos == 0:
        return 0.0
    tp = positive[np.argsort(scores)[::-1]]
    ctp = np.cumsum(tp)
    precision = ctp / np.arange(1, len(tp) + 1)
    recall = ctp / num_pos
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def low_shot_indices(labels: np.ndarray | torch.Tensor, k: int, seed: Sequence[int] | int) -> list[np.ndarray]:
    """For each class, ``min(k, #positives)`` distinct row ids drawn uniformly among its positives (label > 0).

    labels: N x C. Returns one array per class; concatenate them for the training set (the official
    ``convert_low_shot`` keeps an image once per class that drew it). Reproducible by ``seed``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(labels.shape[1]):
        positives = np.flatnonzero(labels[:, c] > 0)
        picks.append(np.sort(rng.permutation(positives)[:k]))
    return picks


def l2_normalize(features: torch.Tensor) -> np.ndarray:
    """The official normalisation: x / (||x|| + 1e-5), as float32 numpy."""
    x = features.detach().cpu().double()
    return (x / (x.norm(dim=1, keepdim=True) + 1e-5)).float().numpy()


def _fit_class(train_x: np.ndarray, y: np.ndarray, test_x: np.ndarray, cost: float, max_iter: int) -> np.ndarray:
    from sklearn.svm import LinearSVC

    y = np.where(y > 0, 1, -1)  # 0 (difficult) -> negative, as official
    if (y < 0).all():  # no positive to learn from: never predicted (0 would beat the others' negative scores)
        return np.full(test_x.shape[0], -np.inf)
    if (y > 0).all():
        return np.zeros(test_x.shape[0])  # no negative: no classifier to fit
    clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                    tol=1e-4, dual=True, max_iter=max_iter, random_state=0)
    with _quiet_convergence():
        clf.fit(train_x, y)
    return clf.decision_function(test_x)


class _quiet_convergence:
    """LinearSVC warns on hitting max_iter (the official setting does, routinely); keep the console readable."""

    def __enter__(self):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", ConvergenceWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def svm_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, cost: float, n_jobs: int = -1,
               max_iter: int = 2000) -> np.ndarray:
    """Decision values (M x C) of one linear SVM per class. train_y: N x C in {1, -1, 0}."""
    from joblib import Parallel, delayed

    cols = Parallel(n_jobs=n_jobs)(delayed(_fit_class)(train_x, train_y[:, c], test_x, cost, max_iter)
                                   for c in range(train_y.shape[1]))
    return np.stack(cols, axis=1)


def score_report(scores: np.ndarray, test_y: np.ndarray, single_label: bool) -> dict[str, float]:
    """mAP (percent) over the classes with a positive in the test split (a class without one has no AP; VOC07's
    20 all have), plus top-1 accuracy for single-label sets (Places205 reports accuracy)."""
    present = [c for c in range(test_y.shape[1]) if (test_y[:, c] > 0).any()]
    aps = [average_precision(scores[:, c], test_y[:, c]) * 100 for c in present]
    out = {"mAP": float(np.mean(aps)) if aps else float("nan")}
    if single_label:
        out["top1"] = float((scores.argmax(1) == test_y.argmax(1)).mean() * 100)
    return out


# ----------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------
def _extract(backbone: nn.Module, source, rows: np.ndarray, args: Any, device: torch.device, desc: str) -> np.ndarray:
    """Normalised features (the official x / (||x|| + 1e-5)) of ``rows`` of a split, in that order."""
    loader = svm_loader(source, rows, data_settings(args), pin_memory=device.type == "cuda")
    feats = extract_features(backbone, loader, device, len(rows), False, not args.no_progress, desc)
    return l2_normalize(feats)


# ----------------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------------
def run_svm(args: Any) -> dict[str, Any]:
    """Full-set (and with --low-shot, k-shot) SVM transfer; prints a markdown table, writes JSON + markdown."""
    setup_logging(args.exp_dir, args.debug)
    positive = dict(valid=lambda v: math.isfinite(v) and v > 0,  # inf/nan: LinearSVC fails later, in a traceback
                    must=" is malformed: every value must be a finite number > 0")
    costs = parse_list(args.cost, "--cost", float, "0.5,1.0", **positive)
    shots = parse_list(args.shots, "--shots", int, "1,2,4,8,16", **positive) if args.low_shot else []
    device = dist_utils.init(DistSettings.of(args))
    args = follow_checkpoint(RunConfig.of(args))
    start = time.perf_counter()
    backbone = eval_backbone(args, device)  # cheap input first: a bad --pretrained fails before the data is read
    args = RunConfig.of(args).replace(arch=backbone.arch)
    train_src, train_y, test_src, test_y, single_label = svm_sets(data_settings(args))
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    logger.info("SVM transfer on %s: %s from %s, %d train / %d test images, %d classes, costs %s", args.dataset,
                args.arch, args.pretrained or "random init", len(train_y), len(test_y), train_y.shape[1], costs)
    _warn_missing_classes(train_y, test_y, shots)

    # which training rows are needed: all for the full set; for --low-shot on Places205 only the sampled ones
    samples = {(k, run): np.concatenate(low_shot_indices(train_y, k, (args.seed, k, run)))
               for k in shots for run in range(args.runs)}
    dataset = spec(args.dataset, "svm")
    full = not (dataset.svm_low_shot_subset and args.low_shot)
    needed = np.arange(len(train_y)) if full else np.unique(np.concatenate(list(samples.values())))
    position = np.full(len(train_y), -1)
    position[needed] = np.arange(len(needed))
    train_x = _extract(backbone, train_src, needed, args, device, "train features")
    test_x = _extract(backbone, test_src, np.arange(len(test_y)), args, device, "test features")
    extract_seconds = time.perf_counter() - start

    def evaluate(rows: np.ndarray, cost: float) -> dict[str, float]:
        scores = svm_scores(train_x[position[rows]], train_y[rows], test_x, cost, args.n_jobs, args.svm_max_iter)
        return score_report(scores, test_y, single_label)

    metric = dataset.svm_metric
    results: dict[str, Any] = {"dataset": args.dataset, "pretrained": args.pretrained, "arch": args.arch,
                               "metric": metric, "costs": costs, "extract_seconds": extract_seconds, "shots": {}}
    for k in shots:
        per_cost = {}
        for cost in costs:
            values = [evaluate(samples[(k, run)], cost)[metric] for run in range(args.runs)]
            per_cost[cost] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}
            logger.info("k=%d cost %g: %s %.2f +- %.2f", k, cost, metric, per_cost[cost]["mean"], per_cost[cost]["std"])
        best = max(per_cost, key=lambda c: per_cost[c]["mean"])
        results["shots"][str(k)] = {"best_cost": best, **per_cost[best], "per_cost": {str(c): v for c, v in per_cost.items()}}
    if full:
        per_cost = {cost: evaluate(np.arange(len(train_y)), cost)[metric] for cost in costs}
        best = max(per_cost, key=per_cost.get)
        results["full"] = {"best_cost": best, "value": per_cost[best], "per_cost": {str(c): v for c, v in per_cost.items()}}
        logger.info("full set: %s %.2f (cost %g)", metric, per_cost[best], best)
    results["seconds"] = time.perf_counter() - start
    table = results_table(results)
    if dist_utils.is_main():
        os.makedirs(args.exp_dir, exist_ok=True)
        paths = [os.path.join(args.exp_dir, f"svm_{args.dataset}.{ext}") for ext in ("md", "json")]
        write_json(paths[1], results)
        write_atomic(paths[0], lambda f: f.write(table + "\n"))
        print(table)
        print(f"wrote {paths[0]} (this table) and {paths[1]} (every run and cost)")
    return results


def _warn_missing_classes(train_y: np.ndarray, test_y: np.ndarray, shots: list[int]) -> None:
    """Say what the scores leave out: classes without a test positive (no AP: outside the mAP), without a training
    positive (never predicted), and with fewer positives than a --shots k (they train on all they have)."""
    classes = train_y.shape[1]
    no_test = int((~(test_y > 0).any(axis=0)).sum())
    no_train = int((~(train_y > 0).any(axis=0)).sum())
    if no_test:
        logger.warning("%d of the %d classes have no positive in the test split: the mAP is over the other %d",
                       no_test, classes, classes - no_test)
    if no_train:
        logger.warning("%d of the %d classes have no positive in the training split: their SVM cannot be trained, "
                       "they are never predicted", no_train, classes)
    fewest = int((train_y > 0).sum(axis=0).min())
    for k in (k for k in shots if k > fewest):
        logger.warning("--shots %d: %d classes have fewer positives (the fewest: %d); they train on all they have",
                       k, int(((train_y > 0).sum(axis=0) < k).sum()), fewest)


def results_table(results: dict[str, Any]) -> str:
    """The paper's Table 1 layout: one row, columns k = 1 ... 16 (mean ± std over runs) and the full set."""
    shots = list(results["shots"])
    head = [f"k={k}" for k in shots] + (["full"] if "full" in results else [])
    cells = [f"{results['shots'][k]['mean']:.2f} ± {results['shots'][k]['std']:.2f}" for k in shots]
    if "full" in results:
        cells.append(f"{results['full']['value']:.2f}")
    name = os.path.basename(results["pretrained"]) if results["pretrained"] else "random init"
    return "\n".join([f"| {results['dataset']} {results['metric']} | " + " | ".join(head) + " |",
                      "|---|" + "---|" * len(head),
                      f"| {results['arch']} ({name}) | " + " | ".join(cells) + " |"])
