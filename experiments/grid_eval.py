"""What a run of ``grid.py`` is measured on, and how: the training subset and the validation split carved from the
training images (``--train-per-class``, ``--val-per-class``), what the run's log.txt says (time, loss, drift), and
the frozen-feature evaluation of a checkpoint on the test split and the validation split.

The validation split exists so that a choice among runs (the factorial's better temperature per method) is made on
images that are neither trained on nor the test split: ``--val-per-class`` images of each class drawn, with a seeded
``torch.Generator``, from the training images that the subset leaves out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import check_made_with, fingerprint, made_with
import small_scale
from pcl import PCLError, checkpoint as ckpt_io
from pcl.cluster import kmeans
from pcl.data import IDX_FILES, load_mnist_family, one_vs_rest, read_idx, write_idx
from pcl.evaluation.cluster_metrics import clustering_scores
from pcl.evaluation.knn import knn_accuracy
from pcl.evaluation.svm import l2_normalize, low_shot_indices, score_report, svm_scores

#: the validation split's idx files, beside the subset's training and test files
VAL_FILES = ("val-images-idx3-ubyte", "val-labels-idx1-ubyte")


#: --val-per-class when not given: this many images per class, or what the smallest class leaves when fewer
VAL_PER_CLASS = 1000


def split_rows(labels: torch.Tensor, per_class: int, val_per_class: int | None, val_seed: int,
               source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The subset's training rows (the first ``per_class`` of each class, official order) and the validation rows
    (``val_per_class`` of each class, None: :data:`VAL_PER_CLASS` or what the smallest class leaves, drawn with
    ``torch.Generator().manual_seed(val_seed)`` from the rest of the class), each sorted."""
    rows = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    if min(len(r) for r in rows) < per_class:
        raise SystemExit(f"error: --train-per-class {per_class}: {source} has fewer training images in some class")
    count = val_count(labels, per_class, val_per_class, source)
    gen = torch.Generator().manual_seed(val_seed)
    val = [r[per_class:][torch.randperm(len(r) - per_class, generator=gen)[:count]] for r in rows]
    return torch.cat([r[:per_class] for r in rows]).sort().values, torch.cat(val).sort().values


def val_count(labels: torch.Tensor, per_class: int, val_per_class: int | None, source: str) -> int:
    """The validation images per class: ``val_per_class`` when the smallest class has that many training images
    beyond the subset's ``per_class`` (else a PCLError), None: :data:`VAL_PER_CLASS` or what it has."""
    spare = max(0, int(torch.bincount(labels).min()) - per_class)
    if val_per_class is None:
        return min(VAL_PER_CLASS, spare)
    if val_per_class > spare:
        raise PCLError(f"--val-per-class {val_per_class}: {source} has only {spare} training images beyond the "
                       f"{per_class} per class of --train-per-class in its smallest class: give --val-per-class "
                       f"{spare} or less (0: no validation split)")
    return val_per_class


def write_subset(name: str, source: str, per_class: int, out: str, val_per_class: int | None = 0,
                 val_seed: int = 0) -> str:
    """The first ``per_class`` training images of every class of an MNIST-family set in ``source``, the whole test
    split and a validation split (``val_per_class`` per class from the other training images, seeded by
    ``val_seed``; :func:`split_rows`), as idx files in ``out``, with ``made_with.json`` (the source's fingerprint and
    these numbers). Written into a temporary folder and renamed into place, so ``out`` is complete or absent; kept
    when it is there and was made the same way, refused (PCLError) when it was made otherwise. Returns ``out``."""
    sets = load_mnist_family(name, source)
    labels = sets["train_labels"]
    count = val_count(labels, per_class, val_per_class, source) if len(labels) else 0
    record = {"dataset": name, "source_fingerprint": fingerprint(sets), "per_class": per_class,
              "val_per_class": count, "val_seed": val_seed}
    fix = "delete it (it is rebuilt from --data in seconds) or give another --exp-root"
    if check_made_with(out, record, "a training subset", fix):
        return out
    keep, val = split_rows(labels, per_class, count, val_seed, source)
    tmp = f"{out}.partial{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    (train_images, train_labels), (test_images, test_labels) = IDX_FILES["train"], IDX_FILES["test"]
    files = [(train_images, sets["train"][keep, 0]), (train_labels, sets["train_labels"][keep]),
             (test_images, sets["test"][:, 0]), (test_labels, sets["test_labels"])]
    if count:
        files += [(VAL_FILES[0], sets["train"][val, 0]), (VAL_FILES[1], sets["train_labels"][val])]
    for base, tensor in files:
        write_idx(os.path.join(tmp, base), tensor)
    made_with(tmp, record)
    try:
        os.rename(tmp, out)
    except OSError:  # another call made it meanwhile: use theirs if it is the same
        shutil.rmtree(tmp, ignore_errors=True)
        if not check_made_with(out, record, "a training subset", fix):
            raise PCLError(f"could not put the training subset in place at {out}: {fix}") from None
    return out


def read_validation(folder: str, size: int) -> dict[str, torch.Tensor]:
    """The validation split of a subset as the in-memory sets hold images: 3-channel uint8 at ``size`` (a bilinear,
    antialiased resize when the stored size differs, as ``pcl.data.load_in_memory`` does), labels as int64; {}
    when the subset has none (--val-per-class 0)."""
    if not os.path.isfile(os.path.join(folder, VAL_FILES[0])):
        return {}
    images, labels = (read_idx(os.path.join(folder, f)) for f in VAL_FILES)
    x = images[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return {"val": x.expand(-1, 3, -1, -1), "val_labels": labels.long()}


def read_log(exp_dir: str) -> dict[str, Any]:
    """What the run's log.txt says beyond fit's record: the training seconds with every epoch counted once (a
    resume repeats the epochs after its checkpoint; the last entry of each wins), the last epoch's loss, the
    checkpoints it resumed from, and the prototype drift (``drift_nmi_k*``) of the last epoch that logged one, with
    that epoch."""
    epochs: dict[int, dict[str, Any]] = {}
    resumed: list[str] = []
    with open(os.path.join(exp_dir, "log.txt"), encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            epochs[int(entry["epoch"])] = entry
            if entry.get("resumed_from"):
                resumed.append(entry["resumed_from"])
    last = epochs[max(epochs)] if epochs else {}
    out: dict[str, Any] = {"train_seconds": round(sum(e["seconds"] for e in epochs.values()), 1),
                           "epochs_logged": len(epochs), "final_loss": last.get("loss"), "resumed_from": resumed,
                           "drift_epoch": None}
    for epoch in sorted(epochs, reverse=True):
        drift = {k: v for k, v in epochs[epoch].items() if k.startswith("drift_nmi_k")}
        if drift:
            out.update(drift, drift_epoch=epoch, drift_nmi_mean=float(np.mean(list(drift.values()))))
            break
    return out


def partition_scores(train_n: torch.Tensor, train_y: torch.Tensor, x_n: torch.Tensor, y: torch.Tensor,
                     seed: int) -> dict[str, float]:
    """kNN top-1 (k = 20, T = 0.07, the training features as the bank) and k-means (k = classes, seeded)
    NMI/AMI/ARI/accuracy of one split's L2-normalised features ``x_n``."""
    classes = int(train_y.max()) + 1
    assign = kmeans(x_n, classes, seed=seed, niter=20, nredo=5)[2].cpu().numpy()
    scores = clustering_scores(y.numpy(), assign, with_ami=True)
    return {"knn_top1": knn_accuracy(train_n, train_y, x_n, y, 20, 0.07),
            "nmi": scores["nmi"] / 100, "ami": scores["ami"] / 100,
            "ari": float(adjusted_rand_score(y.numpy(), assign)), "kmeans_acc": scores["acc"] / 100}


def low_shot(train_x: np.ndarray, train_y: torch.Tensor, evals: dict[str, tuple[np.ndarray, torch.Tensor]],
             opts: argparse.Namespace) -> dict[str, Any]:
    """small_scale's low-shot SVM (VOC07 protocol code: k positives per class, ``opts.svm_runs`` draws seeded by
    (seed, k, run), mAP per cost as the mean over draws) scored on every split of ``evals`` {'test', 'val'} from the
    same SVMs. ``svm_map_{k}shot``: the best cost on the test split (the official script's choice, small_scale's
    number); with 'val': ``val_svm_map_{k}shot`` (best on val) and ``svm_map_{k}shot_val_c`` (test mAP at the cost
    best on val); ``svm_cost``: the costs picked."""
    classes = int(train_y.max()) + 1
    tr = one_vs_rest(train_y, classes).numpy()
    targets = {name: one_vs_rest(y, classes).numpy() for name, (_, y) in evals.items()}
    stacked = np.concatenate([x for x, _ in evals.values()])
    bounds = np.cumsum([0] + [len(x) for x, _ in evals.values()])
    out: dict[str, Any] = {"svm_cost": {}}
    for k in opts.shots:
        draws = [np.concatenate(low_shot_indices(tr, k, (opts.seed, k, run))) for run in range(opts.svm_runs)]
        maps: dict[str, dict[float, list[float]]] = {name: {c: [] for c in opts.svm_costs} for name in evals}
        for cost in opts.svm_costs:
            for rows in draws:
                scores = svm_scores(train_x[rows], tr[rows], stacked, cost, 1)
                for i, name in enumerate(evals):
                    maps[name][cost].append(score_report(scores[bounds[i]:bounds[i + 1]], targets[name], True)["mAP"])
        mean = {name: {c: float(np.mean(v)) for c, v in per.items()} for name, per in maps.items()}
        best = {name: max(per, key=per.get) for name, per in mean.items()}
        out[f"svm_map_{k}shot"] = mean["test"][best["test"]]
        if "val" in mean:
            out[f"val_svm_map_{k}shot"] = mean["val"][best["val"]]
            out[f"svm_map_{k}shot_val_c"] = mean["test"][best["val"]]
        out["svm_cost"][str(k)] = best
    return out


def evaluate(path: str, sets: dict[str, torch.Tensor], seed: int, opts: argparse.Namespace) -> dict[str, Any]:
    """The frozen-feature columns of one checkpoint on the test split (and, when ``sets`` holds one, the validation
    split, ``val_`` columns), every random draw seeded with the run's seed (so the paired runs of a seed share the
    k-means init and the SVM's low-shot draws): small_scale's feature extraction and linear probe, the library's
    k-means, kNN and clustering scores, sklearn's ARI, and :func:`low_shot`."""
    start = time.perf_counter()
    encoder = ckpt_io.load_backbone(path)
    splits = ["train", "test"] + (["val"] if "val" in sets else [])
    feats = {s: small_scale.features(encoder, sets[s], sets[f"{s}_labels"], 512) for s in splits}
    normed = {s: F.normalize(x, dim=1) for s, x in feats.items()}
    train_y = sets["train_labels"]
    row: dict[str, Any] = partition_scores(normed["train"], train_y, normed["test"], sets["test_labels"], seed)
    if "val" in feats:
        row.update({f"val_{k}": v for k, v in partition_scores(normed["train"], train_y, normed["val"],
                                                               sets["val_labels"], seed).items()})
    run_opts = copy.copy(opts)
    run_opts.seed = seed  # small_scale's SVM and probe read their seed from their options
    evals = {s: (l2_normalize(feats[s]), sets[f"{s}_labels"]) for s in splits[1:]}
    row.update(low_shot(l2_normalize(feats["train"]), train_y, evals, run_opts))
    if opts.linear_epochs > 0:
        row["linear_top1"] = small_scale.linear_probe(feats["train"], train_y, feats["test"], sets["test_labels"],
                                                      run_opts)
    row["eval_seconds"] = round(time.perf_counter() - start, 1)
    return row
