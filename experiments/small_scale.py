#!/usr/bin/env python
"""Small-scale benchmark on real images: PCL vs MoCo and PCL's ablations, same budget and seeds per row.

Rows (trained with ``configs/fmnist.yaml`` unless ``--config`` says otherwise, one after another, each alone
on the cores): PCL; MoCo only (ProtoNCE off: warm-up = all epochs); PCL with one fixed temperature instead
of the concentration phi; PCL with one granularity (the config's middle k). Untrained rows: raw pixels and
a random init of the same backbone. Columns, all on frozen features of the test split:
- kNN top-1 (weighted, k = 20, T = 0.07, cosine; the training split is the bank);
- linear probe top-1 on cached center-crop features with the official optimiser (SGD lr 5, momentum 0.9,
  wd 0, 100 epochs, /10 at 60 and 80, batch 256);
- k-means with k = 10 on the L2-normalised test features: NMI, AMI, accuracy (Hungarian matching);
- low-shot SVM mAP (VOC07 protocol code: k positives per class, 5 seeded draws, best cost) at k = 1..16;
- mean Euclidean distance of the L2-normalised training features to their k-means centroid (k = the middle
  granularity): how tightly the samples gather around prototypes;
- wall time of the training (E-steps included, kNN monitoring excluded).
Also writes the JSON and a PNG of kNN top-1 and test NMI vs training time.

    python experiments/small_scale.py                       # Fashion-MNIST from Debian's dataset-fashion-mnist
    python experiments/small_scale.py --epochs 2 -- --width 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import ROOT, cli, default_out, fit_with_curve, hardware, write_json
from pcl import checkpoint as ckpt_io
from pcl.cluster import kmeans
from pcl.config import build_linear_parser, build_pretrain_parser, parse_args, validate_pretrain_args
from pcl.data import TensorLabelledLoader, data_settings, load_in_memory, one_vs_rest
from pcl.evaluation.cluster_metrics import clustering_scores
from pcl.evaluation.knn import knn_accuracy
from pcl.evaluation.linear import probe_features
from pcl.features import extract_features
from pcl.evaluation.svm import l2_normalize, low_shot_indices, score_report, svm_scores
from pcl.model import build_backbone
from pcl.settings import parse_list

PUBLISHED = [  # (features, kNN top-1, NMI, accuracy, source) -- reported elsewhere, NOT measured here
    ("raw pixels, k-means (published)", None, 0.51, 0.47, "as tabulated in the N2D paper (McConville et al. 2019)"),
    ("DEC (published)", None, 0.65, 0.62, "N2D paper's table, DEC (Xie et al. 2016) on Fashion-MNIST"),
    ("N2D (published)", None, 0.684, 0.672, "McConville et al. 2019"),
    ("raw pixels, kNN k=5 L1 (published)", 85.4, None, None, "Fashion-MNIST paper (Xiao et al. 2017) benchmark"),
]


def trained_rows(cfg: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    ks = list(cfg.num_cluster)
    mid = ks[len(ks) // 2]
    return {"pcl": ("PCL", []),
            "moco": ("MoCo only (ProtoNCE off)", ["--warmup-epoch", str(cfg.epochs)]),
            "fixed_t": ("PCL, fixed temperature", ["--fixed-concentration"]),
            "one_gran": (f"PCL, one granularity (k={mid})", ["--num-cluster", str(mid)])}


def train(name: str, argv: list[str]) -> tuple[dict, str]:
    """Pretrain one row in this process; returns its record (curve, wall time, final loss) and checkpoint."""
    stats, record = fit_with_curve(argv)
    record.update(name=name, final_loss=stats.get("loss"))
    return record, os.path.join(record["exp_dir"], ckpt_io.LAST)


@torch.no_grad()
def features(encoder: nn.Module | None, images: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
    """Pooled backbone features (or the normalised pixels when ``encoder`` is None) of every image, in order."""
    loader = TensorLabelledLoader(images, labels, batch)
    return extract_features(encoder, loader, torch.device("cpu"), images.shape[0], normalize=False)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 opts: argparse.Namespace) -> float:
    """The linear protocol's cached-features probe (``pcl.evaluation.linear.probe_features``) with its own flags:
    lr ``--linear-lr``, ``--linear-epochs``, lr /10 at 60% and 80% of them, the rest the protocol's defaults
    (momentum 0.9, wd 0, batch 256); top-1 (percent) after the last epoch."""
    epochs = opts.linear_epochs
    probe = parse_args(build_linear_parser(), ["--lr", repr(opts.linear_lr), "--epochs", str(epochs), "--schedule",
                                               str(int(epochs * 0.6)), str(int(epochs * 0.8)), "--seed",
                                               str(opts.seed)])
    return probe_features(train_x, train_y, test_x, test_y, probe)["top1"]


def low_shot_svm(train_x: np.ndarray, train_y: torch.Tensor, test_x: np.ndarray, test_y: torch.Tensor,
                 opts: argparse.Namespace) -> dict[str, float]:
    """mAP (percent) of one linear SVM per class trained on k positives per class, mean of ``opts.svm_runs``
    seeded draws, best of ``opts.svm_costs`` -- the VOC07 low-shot protocol's code on this set."""
    classes = int(train_y.max()) + 1
    tr, te = one_vs_rest(train_y, classes).numpy(), one_vs_rest(test_y, classes).numpy()
    out = {}
    for k in opts.shots:
        draws = [np.concatenate(low_shot_indices(tr, k, (opts.seed, k, run))) for run in range(opts.svm_runs)]
        best = max(np.mean([score_report(svm_scores(train_x[rows], tr[rows], test_x, cost, 1), te, True)["mAP"]
                            for rows in draws]) for cost in opts.svm_costs)
        out[str(k)] = float(best)
    return out


def evaluate(encoder: nn.Module | None, sets: dict, cfg: argparse.Namespace, opts: argparse.Namespace) -> dict:
    start = time.perf_counter()
    batch = 512
    train_x = features(encoder, sets["train"], sets["train_labels"], batch)
    test_x = features(encoder, sets["test"], sets["test_labels"], batch)
    train_y, test_y = sets["train_labels"], sets["test_labels"]
    train_n, test_n = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    classes = int(train_y.max()) + 1
    assign = kmeans(test_n, classes, seed=opts.seed, niter=20, nredo=5)[2]
    scores = clustering_scores(test_y.numpy(), assign.cpu().numpy(), with_ami=True)
    mid = list(cfg.num_cluster)[len(cfg.num_cluster) // 2]
    dist2 = kmeans(train_n, mid, seed=opts.seed, niter=20, nredo=1)[1]
    row = {"knn_top1": knn_accuracy(train_n, train_y, test_n, test_y, 20, 0.07),
           "linear_top1": linear_probe(train_x, train_y, test_x, test_y, opts),
           "nmi": scores["nmi"] / 100, "ami": scores["ami"] / 100, "kmeans_acc": scores["acc"] / 100,
           "svm_map": low_shot_svm(l2_normalize(train_x), train_y, l2_normalize(test_x), test_y, opts),
           "proto_distance": float(dist2.clamp_min(0).sqrt().mean()), "feature_dim": int(train_x.shape[1])}
    row["eval_seconds"] = round(time.perf_counter() - start, 1)
    return row


def table(results: list[dict], shots: list[int]) -> str:
    head = ("| features | kNN top-1 | linear top-1 | NMI | AMI | k-means acc | "
            + " | ".join(f"SVM mAP k={k}" for k in shots) + " | dist. to prototype | train time |")
    lines = [head, "|" + "---|" * (8 + len(shots))]
    for r in results:
        svm = " | ".join(f"{r['svm_map'][str(k)]:.1f}" for k in shots)
        wall = f"{r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "-"
        lines.append(f"| {r['name']} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | {r['nmi']:.3f} | {r['ami']:.3f} "
                     f"| {r['kmeans_acc']:.3f} | {svm} | {r['proto_distance']:.3f} | {wall} |")
    for name, knn, nmi, acc, _ in PUBLISHED:
        cell = lambda v, fmt: "-" if v is None else fmt.format(v)  # noqa: E731
        lines.append(f"| {name} | {cell(knn, '{:.1f}')} | - | {cell(nmi, '{:.3f}')} | - | {cell(acc, '{:.3f}')} | "
                     + " | ".join("-" for _ in shots) + " | - | - |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'): no PNG written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        if not r.get("curve"):
            continue
        t = [0.0] + [c["train_seconds"] / 60 for c in r["curve"]]
        axes[0].plot(t, [r["start"]["knn_top1"]] + [c["knn_top1"] for c in r["curve"]], marker="o", label=r["name"])
        axes[1].plot(t, [r["start"]["nmi"] * 100] + [c["test_nmi"] for c in r["curve"]], marker="o", label=r["name"])
    for ax, label in zip(axes, ("kNN top-1 (%)", "NMI of k-means, k=10 (%)")):
        ax.set_xlabel("training time (min)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for r in results:
        if r["key"] == "raw":
            axes[0].axhline(r["knn_top1"], color="grey", ls="--", label="raw pixels")
            axes[1].axhline(r["nmi"] * 100, color="grey", ls="--", label="raw pixels")
    axes[1].legend(fontsize=7)
    fig.suptitle("Fashion-MNIST test split, frozen features", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "fmnist.yaml"))
    p.add_argument("--data", default=None, help="dataset folder (default: the config's)")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs (warm-up scales with it)")
    p.add_argument("--rows", default="pcl,moco,fixed_t,one_gran,raw,random")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--svm-runs", type=int, default=5)
    p.add_argument("--svm-costs", default="0.1,1,10")
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--linear-lr", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exp-root", default="exp/small_scale")
    p.add_argument("--out", default=default_out("small_scale_fmnist.json"))
    p.add_argument("overrides", nargs="*", help="extra main_pcl flags, after --")
    opts = p.parse_args(argv)
    opts.shots = parse_list(opts.shots, "--shots")
    opts.svm_costs = parse_list(opts.svm_costs, "--svm-costs", float)
    base = ["-c", opts.config, "--no-progress", "--no-knn-eval", "--seed", str(opts.seed)]
    base += [opts.data] if opts.data else []
    cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), base + opts.overrides))
    if opts.epochs is not None:
        warmup = max(1, round(cfg.warmup_epoch * opts.epochs / cfg.epochs))
        base += ["--epochs", str(opts.epochs), "--warmup-epoch", str(warmup), "--save-freq", str(opts.epochs)]
        cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), base + opts.overrides))
    sets = load_in_memory(data_settings(cfg))
    torch.manual_seed(opts.seed)
    random_init = build_backbone(cfg.arch, cfg.width, cfg.stem).eval()
    start_scores = evaluate(random_init, sets, cfg, opts)  # every trained row starts from this init
    rows, results = opts.rows.split(","), []
    for key, (name, extra) in trained_rows(cfg).items():
        if key not in rows:
            continue
        # the row's own flags come last: they win over the overrides (e.g. MoCo's warm-up = all epochs)
        record, path = train(name, base + opts.overrides + ["--exp-dir", f"{opts.exp_root}/{key}"] + extra)
        record.update(evaluate(ckpt_io.load_backbone(path), sets, cfg, opts), key=key, start=start_scores)
        results.append(record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("argv", "start")}), flush=True)
    if "raw" in rows:
        results.append({"name": "raw pixels (L2-normalised)", "key": "raw", **evaluate(None, sets, cfg, opts)})
    if "random" in rows:
        results.append({"name": "random init (same backbone)", "key": "random", **start_scores})
    hw = hardware()
    text = table(results, opts.shots)
    print(f"\nHardware: {hw}\nConfig: {opts.config}, epochs {cfg.epochs}, warm-up {cfg.warmup_epoch}, "
          f"k {cfg.num_cluster}\n\n{text}")
    for r in results:
        if r.get("curve"):
            print(f"\n{r['name']}: " + ", ".join(f"{c['train_seconds'] / 60:.1f} min kNN {c['knn_top1']:.2f} "
                                                f"NMI {c['test_nmi']:.1f}" for c in r["curve"]))
    published = [dict(zip(("name", "knn_top1", "nmi", "kmeans_acc", "source"), row)) for row in PUBLISHED]
    write_json({"hardware": hw, "config": opts.config, "epochs": cfg.epochs, "warmup_epoch": cfg.warmup_epoch,
                "num_cluster": cfg.num_cluster, "overrides": opts.overrides, "results": results,
                "published_not_measured_here": published, "table": text}, opts.out)
    plot(results, os.path.splitext(opts.out)[0] + ".png")
    return results


if __name__ == "__main__":
    cli(main)
