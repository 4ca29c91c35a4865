#!/usr/bin/env python
"""A resumable grid of PCL variants x seeds, with paired comparisons against MoCo-only.

Single runs of small_scale.py cannot tell a 0.01 NMI effect from seed noise. This driver trains every (variant,
seed) of a named grid with ``configs/fmnist.yaml`` (or ``--config``), evaluates each on frozen test features, and
compares every variant with the baseline (``moco``) seed by seed: the same seed means the same initialisation,
data order and augmentations, so the paired difference removes the noise the two runs share.

Variants (each a list of main_pcl flags on top of the config and the overrides after ``--``; its own flags win):
  pcl          the config as it is
  moco         ProtoNCE off: --warmup-epoch = --epochs (MoCo with PCL's augmentations and schedule)
  reseed       --kmeans-reseed: a fresh k-means seed at every E-step instead of the same seed each time
  proto_w001   --proto-weight 0.01: ProtoNCE at 1/100 of InfoNCE
  k_large      --num-cluster 4b,8b,16b for the batch b (1024,2048,4096 at the config's 256): k >= 4 x batch, so
               few batch-mates share a prototype (k-means at k=4096 adds ~40 s per E-step on 2 cores; the run
               needs >= 16 x batch training images, fit refuses a k above the training set)
  unique       --unique-prototypes: each prototype once in a sample's ProtoNCE denominator
  moco_t03     MoCo-only at --temperature 0.3
  moco_t05     MoCo-only at --temperature 0.5: does a softer InfoNCE alone give what the prototypes give?

Columns per run, on the L2-normalised features of the test split: k-means (k = number of classes, seeded with the
run's seed) NMI, AMI, ARI and accuracy; kNN top-1 (k = 20, T = 0.07; the training split is the bank); low-shot SVM
mAP at ``--shots`` (default 1 and 4 positives per class; small_scale's VOC07 protocol code); optionally the
linear probe (``--linear-epochs``, 0 = off, the default); the training time (E-steps in, kNN monitoring off; an
epoch trained twice across a resume counts once); and the prototype drift of the last E-step that has one
(``drift_nmi_k{k}`` in log.txt: NMI in percent between consecutive E-steps' assignments; MoCo rows have none).

Resumable: runs go seed by seed (every variant at seed 0, then at seed 1, ...), so an interrupted grid already
holds complete pairs. Each run writes OUT_DIR/<variant>_seed<seed>.json (atomically) as soon as it is evaluated;
a rerun skips every run whose JSON parses, and continues an interrupted one from the newest checkpoint in its
EXP_ROOT/<variant>_seed<seed> (every run is started with ``--resume auto``). A JSON made with other flags stops the
grid rather than mixing settings in one summary. The summary (OUT_DIR/summary.json and the printed markdown) is
rebuilt from the JSONs at the end of each call: per variant mean +- sample standard deviation over seeds; per
variant the paired difference to the baseline with a 95 % Student-t interval (n - 1 degrees of freedom).
OUT_DIR/drift.png plots, per variant with E-steps, the drift and the coarsest k's NMI with the training labels at
every E-step (matplotlib; skipped without it).

    python experiments/grid.py                                   # 8 variants x seeds 0,1,2, ~12 min a run on 2 cores
    python experiments/grid.py --train-per-class 2000 -- -b 128 --lr 0.06   # 20k images: ~9 min a run, 1 thread
    python experiments/grid.py --variants pcl,moco,reseed --seeds 0,1,2,3,4
    python experiments/grid.py --epochs 2 --out-dir /tmp/grid -- --width 4   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import ROOT, RESULTS, fit_with_curve, hardware, log_epochs, use_cores, write_json
import small_scale
from pcl import checkpoint as ckpt_io
from pcl.cluster import kmeans
from pcl.config import build_pretrain_parser, parse_args, validate_pretrain_args
from pcl.data import IDX_FILES, data_settings, load_in_memory, load_mnist_family, write_idx
from pcl.evaluation.cluster_metrics import clustering_scores
from pcl.evaluation.knn import knn_accuracy
from pcl.evaluation.svm import l2_normalize
from pcl.settings import parse_list

BASELINE = "moco"
#: what a finished run's JSON must hold (besides its per-shot SVM columns); anything less is run again
REQUIRED = ("variant", "seed", "settings", "train_seconds", "knn_top1", "nmi", "ami", "ari", "kmeans_acc")
#: t_{0.975, dof} for dof = 1..30, used only when scipy is missing (scipy comes with scikit-learn)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def variants(cfg: argparse.Namespace) -> dict[str, list[str]]:
    """The grid's rows: name -> main_pcl flags added after the config and the overrides (so they win). ``cfg`` is
    the resolved config of the grid: MoCo's warm-up is its epochs, k_large's k scale with its batch size."""
    moco = ["--warmup-epoch", str(cfg.epochs)]
    large = [m * cfg.batch_size for m in (4, 8, 16)]
    return {"pcl": [],
            "moco": moco,
            "reseed": ["--kmeans-reseed"],
            "proto_w001": ["--proto-weight", "0.01"],
            "k_large": ["--num-cluster", ",".join(map(str, large))],
            "unique": ["--unique-prototypes"],
            "moco_t03": moco + ["--temperature", "0.3"],
            "moco_t05": moco + ["--temperature", "0.5"]}


def write_subset(name: str, source: str, per_class: int, out: str) -> str:
    """The first ``per_class`` training images of every class of an MNIST-family set in ``source``, with the whole
    test split, as idx files in ``out`` (kept when they are already there): a cheaper training split that keeps the
    classes balanced and the test features the same. Returns ``out``."""
    if all(os.path.isfile(os.path.join(out, f)) for pair in IDX_FILES.values() for f in pair):
        return out
    sets = load_mnist_family(name, source)
    labels = sets["train_labels"]
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(int(labels.max()) + 1)])
    keep = keep.sort().values  # the official order, thinned
    if len(keep) < per_class * (int(labels.max()) + 1):
        raise SystemExit(f"error: --train-per-class {per_class}: {source} has fewer training images in some class")
    os.makedirs(out, exist_ok=True)
    (train_images, train_labels), (test_images, test_labels) = IDX_FILES["train"], IDX_FILES["test"]
    for base, tensor in ((train_images, sets["train"][keep, 0]), (train_labels, labels[keep]),
                         (test_images, sets["test"][:, 0]), (test_labels, sets["test_labels"])):
        write_idx(os.path.join(out, base), tensor)
    return out


def run_name(variant: str, seed: int) -> str:
    """The stem of a run's JSON and exp dir: ``<variant>_seed<seed>``."""
    return f"{variant}_seed{seed}"


def read_finished(path: str) -> dict[str, Any] | None:
    """A run's JSON when it is complete (parses, holds every column); None when it must be (re)run."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(key not in record for key in REQUIRED):
        return None
    return record


def write_atomic(obj: dict[str, Any], path: str) -> None:
    """Write the JSON next to ``path`` and rename it into place: an interrupted write never leaves a JSON that
    parses but is cut short (a rerun would then skip a run it lacks)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_log(exp_dir: str) -> dict[str, Any]:
    """What the run's log.txt says beyond fit's record: the training seconds with every epoch counted once (a
    resume repeats the epochs after its checkpoint; the last entry of each wins), the last epoch's loss, the
    checkpoints it resumed from, and the prototype drift (``drift_nmi_k*``) of the last epoch that logged one, with that epoch."""
    epochs: dict[int, dict[str, Any]] = {}
    resumed: list[str] = []
    with open(os.path.join(exp_dir, "log.txt")) as f:
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


def evaluate(path: str, sets: dict[str, torch.Tensor], seed: int, opts: argparse.Namespace) -> dict[str, Any]:
    """The frozen-feature columns of one checkpoint, every random draw seeded with the run's seed (so the paired
    runs of a seed share the k-means init and the SVM's low-shot draws): small_scale's feature extraction, SVM and
    linear probe, the library's k-means, kNN and clustering scores, and sklearn's ARI."""
    start = time.perf_counter()
    encoder = ckpt_io.load_backbone(path)
    train_x = small_scale.features(encoder, sets["train"], sets["train_labels"], 512)
    test_x = small_scale.features(encoder, sets["test"], sets["test_labels"], 512)
    train_y, test_y = sets["train_labels"], sets["test_labels"]
    train_n, test_n = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    classes = int(train_y.max()) + 1
    assign = kmeans(test_n, classes, seed=seed, niter=20, nredo=5)[2].cpu().numpy()
    scores = clustering_scores(test_y.numpy(), assign, with_ami=True)
    run_opts = copy.copy(opts)
    run_opts.seed = seed  # small_scale's SVM and probe read their seed from their options
    row: dict[str, Any] = {
        "knn_top1": knn_accuracy(train_n, train_y, test_n, test_y, 20, 0.07),
        "nmi": scores["nmi"] / 100, "ami": scores["ami"] / 100,
        "ari": float(adjusted_rand_score(test_y.numpy(), assign)), "kmeans_acc": scores["acc"] / 100}
    svm = small_scale.low_shot_svm(l2_normalize(train_x), train_y, l2_normalize(test_x), test_y, run_opts)
    row.update({f"svm_map_{k}shot": v for k, v in svm.items()})
    if opts.linear_epochs > 0:
        row["linear_top1"] = small_scale.linear_probe(train_x, train_y, test_x, test_y, run_opts)
    row["eval_seconds"] = round(time.perf_counter() - start, 1)
    return row


def t_quantile(dof: int) -> float:
    """t_{0.975} with ``dof`` degrees of freedom: scipy's when installed, else the table (dof <= 30) or, beyond
    it, the Cornish-Fisher expansion z + (z^3 + z) / (4 dof) (under 0.1 % off there)."""
    try:
        from scipy.stats import t
    except ImportError:
        if dof <= len(T975):
            return T975[dof - 1]
        z = 1.959964
        return z + (z ** 3 + z) / (4 * dof)
    return float(t.ppf(0.975, dof))


def columns(records: list[dict[str, Any]]) -> list[str]:
    """The numeric columns the runs hold (evaluation, time, drift), in a fixed order: first seen first."""
    skip = {"seed", "epochs_logged", "drift_epoch", "eval_seconds", "wall_seconds", "final_loss"}
    out: list[str] = []
    for r in records:
        out += [k for k, v in r.items() if k not in skip and k not in out and isinstance(v, (int, float))
                and not isinstance(v, bool)]
    return out


def mean_sd(values: list[float]) -> dict[str, Any]:
    """n, mean and the sample standard deviation (ddof 1; None for one value)."""
    a = np.asarray(values, dtype=float)
    return {"n": len(a), "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else None}


def paired(runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]], cols: list[str]) -> dict[str, Any]:
    """Per column, the variant minus the baseline on the seeds both have: mean, sd, n, the seeds, and the 95 %
    interval mean +- t_{0.975, n-1} sd / sqrt(n) (None below two pairs)."""
    seeds = sorted(set(runs) & set(base))
    out: dict[str, Any] = {}
    for col in cols:
        both = [s for s in seeds if col in runs[s] and col in base[s]]
        if not both:
            continue
        d = [runs[s][col] - base[s][col] for s in both]
        stats = mean_sd(d)
        if stats["n"] > 1:
            half = t_quantile(stats["n"] - 1) * stats["sd"] / math.sqrt(stats["n"])
            stats["ci95"] = [stats["mean"] - half, stats["mean"] + half]
        else:
            stats["ci95"] = None
        out[col] = {**stats, "seeds": both}
    return out


def summarise(records: dict[str, dict[int, dict[str, Any]]], baseline: str) -> dict[str, Any]:
    """The summary of finished runs {variant: {seed: record}}: per variant mean/sd per column, and per variant
    other than the baseline its paired differences to it."""
    flat = [r for runs in records.values() for r in runs.values()]
    cols = columns(flat)
    per_variant = {v: {c: mean_sd([r[c] for r in runs.values() if c in r]) for c in cols
                       if any(c in r for r in runs.values())} for v, runs in records.items() if runs}
    diffs = {v: paired(runs, records[baseline], cols) for v, runs in records.items()
             if v != baseline and runs and records.get(baseline)}
    return {"columns": cols, "per_variant": per_variant, "paired_vs_" + baseline: diffs}


TABLE = [("kNN top-1", "knn_top1", "{:.2f}"), ("linear top-1", "linear_top1", "{:.2f}"), ("NMI", "nmi", "{:.3f}"),
         ("AMI", "ami", "{:.3f}"), ("ARI", "ari", "{:.3f}"), ("k-means acc", "kmeans_acc", "{:.3f}")]


def table_columns(cols: list[str]) -> list[tuple[str, str, str]]:
    """The markdown tables' columns that the runs hold: the evaluation's, the SVM shots, drift, training time."""
    shots = [(f"SVM mAP {c[len('svm_map_'):-len('shot')]}-shot", c, "{:.1f}") for c in cols if c.startswith("svm_map_")]
    tail = [("drift NMI % (mean over k)", "drift_nmi_mean", "{:.1f}"), ("train s", "train_seconds", "{:.0f}")]
    return [c for c in TABLE + shots + tail if c[1] in cols]


def markdown(summary: dict[str, Any], baseline: str) -> str:
    """Two markdown tables: mean +- sd over seeds per variant, and each variant minus the baseline (paired over
    seeds) with its 95 % interval."""
    cols = table_columns(summary["columns"])
    head = "| variant | seeds | " + " | ".join(name for name, _, _ in cols) + " |"
    rule = "|" + "---|" * (len(cols) + 2)
    lines = ["Mean ± sample sd over seeds:", "", head, rule]
    for v, stats in summary["per_variant"].items():
        n = max(s["n"] for s in stats.values())
        cells = []
        for _, key, fmt in cols:
            s = stats.get(key)
            cells.append("-" if s is None else fmt.format(s["mean"]) + (f" ± {fmt.format(s['sd'])}" if s["sd"] is not
                                                                        None else ""))
        lines.append(f"| {v} | {n} | " + " | ".join(cells) + " |")
    diffs = summary["paired_vs_" + baseline]
    lines += ["", f"Paired difference to {baseline} (same seed), mean [95 % t interval]:", "", head, rule]
    for v, stats in diffs.items():
        n = max((s["n"] for s in stats.values()), default=0)
        cells = []
        for _, key, fmt in cols:
            s = stats.get(key)
            if s is None:
                cells.append("-")
            else:
                ci = "" if s["ci95"] is None else f" [{fmt.format(s['ci95'][0])}, {fmt.format(s['ci95'][1])}]"
                cells.append(("+" if s["mean"] >= 0 else "") + fmt.format(s["mean"]) + ci)
        lines.append(f"| {v} | {n} | " + " | ".join(cells) + " |")
    if not diffs:
        lines.append(f"(no pairs: {baseline} has no finished run among these seeds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None,
         train: Callable[[list[str]], tuple[dict[str, Any], dict[str, Any]]] = fit_with_curve) -> dict[str, Any]:
    """Run the missing runs of the grid, then summarise every finished one. Returns {'ran': names (re)made in this
    call, 'skipped': names found finished, 'summary': the summary, 'table': its markdown}. ``train`` is the
    pretraining call (``study.fit_with_curve``)."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "fmnist.yaml"))
    p.add_argument("--data", default=None, help="dataset folder (default: the config's)")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs (warm-up scales with it)")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="train on the first N training images of each class (idx files written to "
                        "EXP_ROOT/data_<N>_per_class; the test split stays whole); MNIST-family configs only")
    p.add_argument("--variants", default="pcl,moco,reseed,proto_w001,k_large,unique,moco_t03,moco_t05",
                   help="comma-separated rows of the grid (see above)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 2 for an interval; 3+ advised)")
    p.add_argument("--baseline", default=BASELINE, help="the variant the paired differences are taken against")
    p.add_argument("--shots", default="1,4", help="positives per class of the low-shot SVM columns")
    p.add_argument("--svm-runs", type=int, default=5, help="seeded low-shot draws per shot")
    p.add_argument("--svm-costs", default="0.1,1,10")
    p.add_argument("--linear-epochs", type=int, default=0, help="linear probe epochs (0: no linear column)")
    p.add_argument("--linear-lr", type=float, default=5.0)
    p.add_argument("--exp-root", default="exp/grid", help="each run trains in EXP_ROOT/<variant>_seed<seed>")
    p.add_argument("--out-dir", default=os.path.join(RESULTS, "grid"),
                   help="OUT_DIR/<variant>_seed<seed>.json per run, OUT_DIR/summary.json")
    p.add_argument("overrides", nargs="*", help="extra main_pcl flags for every run, after --")
    opts = p.parse_args(argv)
    opts.shots = parse_list(opts.shots, "--shots")
    opts.svm_costs = parse_list(opts.svm_costs, "--svm-costs", float)
    seeds = parse_list(opts.seeds, "--seeds")
    chosen = [v for v in opts.variants.split(",") if v]

    common = ["-c", opts.config, "--no-progress", "--no-knn-eval"]
    base = common + ([opts.data] if opts.data else [])
    cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), base + opts.overrides))
    if opts.train_per_class is not None:
        subset = write_subset(cfg.dataset, cfg.data, opts.train_per_class,
                              os.path.join(opts.exp_root, f"data_{opts.train_per_class}_per_class"))
        base = common + [subset, "--expect-images", str(opts.train_per_class * cfg.expect_classes)]
        cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), base + opts.overrides))
    if opts.epochs is not None:
        warmup = max(1, round(cfg.warmup_epoch * opts.epochs / cfg.epochs))
        base += ["--epochs", str(opts.epochs), "--warmup-epoch", str(warmup),
                 "--save-freq", str(max(1, min(cfg.save_freq, opts.epochs // 2)))]
        cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), base + opts.overrides))
    grid = variants(cfg)
    unknown = [v for v in chosen + [opts.baseline] if v not in grid]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: pick from {','.join(grid)}")
    sets: dict[str, torch.Tensor] | None = None  # loaded once, and only when a run is missing

    ran, skipped = [], []
    records: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in chosen}
    for seed in seeds:  # seed by seed: an interrupted grid already holds complete pairs
        for v in chosen:
            name = run_name(v, seed)
            path = os.path.join(opts.out_dir, name + ".json")
            exp_dir = os.path.join(opts.exp_root, name)
            run_argv = base + ["--seed", str(seed)] + opts.overrides + ["--exp-dir", exp_dir, "--resume", "auto"] \
                + grid[v]
            settings = {"argv": run_argv, "shots": opts.shots, "svm_runs": opts.svm_runs,
                        "svm_costs": opts.svm_costs, "linear_epochs": opts.linear_epochs, "linear_lr": opts.linear_lr}
            done = read_finished(path)
            if done is not None:
                check_same(done["settings"], settings, path)
                records[v][seed] = done
                skipped.append(name)
                continue
            print(f"\n== {name}: {' '.join(grid[v]) or '(the config)'}", flush=True)
            fitted = train(run_argv)[1]
            if sets is None:
                sets = load_in_memory(data_settings(cfg))
            record: dict[str, Any] = {"variant": v, "seed": seed, "flags": grid[v], "settings": settings,
                                      "exp_dir": exp_dir, "wall_seconds": fitted["wall_seconds"], **read_log(exp_dir)}
            record.update(evaluate(os.path.join(exp_dir, ckpt_io.LAST), sets, seed, opts))
            write_atomic(record, path)
            records[v][seed] = record
            ran.append(name)
            print(json.dumps({k: val for k, val in record.items() if k != "settings"}), flush=True)
    summary = summarise(records, opts.baseline)
    text = markdown(summary, opts.baseline)
    hw = hardware()
    print(f"\nHardware: {hw}\nConfig: {opts.config}, epochs {cfg.epochs}, overrides {opts.overrides}\n\n{text}")
    write_json({"hardware": hw, "config": opts.config, "epochs": cfg.epochs, "overrides": opts.overrides,
                "variants": {v: grid[v] for v in chosen}, "seeds": seeds, "baseline": opts.baseline,
                **summary, "table": text}, os.path.join(opts.out_dir, "summary.json"))
    plotted = plot_drift(records, os.path.join(opts.out_dir, "drift.png"))
    if plotted:
        print(f"drift plot: {plotted}")
    return {"ran": ran, "skipped": skipped, "summary": summary, "table": text}


def drift_curves(exp_dir: str) -> dict[str, dict[int, float]]:
    """Per E-step epoch of one run (log.txt, the last entry of an epoch wins): 'drift' = the NMI % between this and
    the previous E-step's assignments, averaged over the granularities, and 'labels' = the NMI % of the coarsest
    granularity's assignment with the training labels (the monitor's ``nmi_k{k}``). Empty for MoCo-only runs."""
    out: dict[str, dict[int, float]] = {"drift": {}, "labels": {}}
    for epoch, entry in log_epochs(exp_dir).items():
        drift = [v for k, v in entry.items() if k.startswith("drift_nmi_k")]
        if drift:
            out["drift"][epoch] = float(np.mean(drift))
        ks = sorted(int(k[len("nmi_k"):]) for k in entry if k.startswith("nmi_k"))
        if ks:
            out["labels"][epoch] = float(entry[f"nmi_k{ks[0]}"])
    return out


def plot_drift(records: dict[str, dict[int, dict[str, Any]]], path: str) -> str | None:
    """The freeze diagnostic of the grid: per variant that runs E-steps, the prototype drift (left) and the coarsest
    granularity's NMI with the training labels (right) at each E-step, the mean over its seeds (thin lines: each
    seed). Written to ``path`` (PNG); None when matplotlib is missing or no run has an E-step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = {v: [drift_curves(r["exp_dir"]) for r in runs.values() if os.path.isfile(os.path.join(r["exp_dir"],
                                                                                                   "log.txt"))]
              for v, runs in records.items()}
    curves = {v: c for v, c in curves.items() if any(run["labels"] or run["drift"] for run in c)}
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (key, title), ax in zip((("drift", "prototype drift: NMI % with the previous E-step (mean over k)"),
                                 ("labels", "NMI % of the coarsest k with the training labels")), axes):
        for i, (v, runs) in enumerate(curves.items()):
            color = f"C{i}"
            for run in runs:
                ax.plot(list(run[key]), list(run[key].values()), color=color, alpha=0.25, lw=0.8)
            epochs = sorted(set.intersection(*(set(run[key]) for run in runs))) if runs else []
            if epochs:
                ax.plot(epochs, [np.mean([run[key][e] for run in runs]) for e in epochs], color=color, lw=2,
                        label=f"{v} ({len(runs)} seeds)")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch (E-step before it)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_same(found: dict[str, Any], wanted: dict[str, Any], path: str) -> None:
    """A finished run counts only when it was made with the flags this call would use (its exp dir aside: moving
    --exp-root keeps the results valid); otherwise stop rather than average different experiments, naming the
    JSON to delete (or pick another --out-dir)."""
    def key(settings: dict[str, Any]) -> str:
        argv = list(settings["argv"])
        if "--exp-dir" in argv:
            i = argv.index("--exp-dir")
            del argv[i:i + 2]
        return json.dumps({**settings, "argv": argv}, sort_keys=True)

    if key(found) != key(wanted):
        raise SystemExit(f"error: {path} was made with other settings ({found}) than this grid's ({wanted}); delete "
                         f"it to rerun that run, or use another --out-dir")


if __name__ == "__main__":
    use_cores()
    main()
