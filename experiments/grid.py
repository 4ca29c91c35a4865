#!/usr/bin/env python
"""A resumable grid of PCL variants x seeds, with paired comparisons against MoCo-only and the pre-registered
{MoCo, PCL} x {T = 0.2, T = 0.5} factorial (docs/results/factorial.md).

Single runs of small_scale.py cannot tell a 0.01 NMI effect from seed noise. This driver trains every (variant,
seed) of a named grid with ``configs/fmnist.yaml`` (or ``--config``), evaluates each on frozen test features (and
on a validation split carved from the training images), and compares every variant with the baseline (``moco``)
seed by seed: the same seed means the same initialisation, data order and augmentations, so the paired difference
removes the noise the two runs share.

Variants (:data:`VARIANTS`: each a list of main_pcl flags on top of the config and the overrides after ``--``; its
own flags win; ``{epochs}`` and ``{batch_x4}`` etc. are filled from the resolved config):
  pcl          the config as it is
  moco         ProtoNCE off: --warmup-epoch = --epochs (MoCo with PCL's augmentations and schedule)
  reseed       --kmeans-reseed: a fresh k-means seed at every E-step instead of the same seed each time
  proto_w001   --proto-weight 0.01: ProtoNCE at 1/100 of InfoNCE
  k_large      --num-cluster 4b,8b,16b for the batch b (1024,2048,4096 at the config's 256): k >= 4 x batch, so
               few batch-mates share a prototype (k-means at k=4096 adds ~40 s per E-step on 2 cores; the run
               needs >= 16 x batch training images: checked before any run starts)
  unique       --unique-prototypes: each prototype once in a sample's ProtoNCE denominator
  moco_t03     MoCo-only at --temperature 0.3
  moco_t05     MoCo-only at --temperature 0.5: does a softer InfoNCE alone give what the prototypes give?
  pcl_t05      PCL at --temperature 0.5 (InfoNCE's temperature, and phi's mean): the factorial's fourth cell
  bank         --estep-features bank: the E-step clusters what the training steps computed (no feature pass): per
               sample the mean of its key and query (--bank-views pair, the default)
  bank_warm    bank with --kmeans-init previous: each E-step's k-means starts from the previous centroids
  bank_key     bank with --bank-views key: the key alone

Columns per run, on the L2-normalised features of the test split: k-means (k = number of classes, seeded with the
run's seed) NMI, AMI, ARI and accuracy; kNN top-1 (k = 20, T = 0.07; the training split is the bank); low-shot SVM
mAP at ``--shots`` (default 1 and 4 positives per class; small_scale's VOC07 protocol code, C the best of
``--svm-costs`` on the test split as the official script picks it, and ``svm_map_{k}shot_val_c`` with C picked on
the validation split); optionally the linear probe (``--linear-epochs``, 0 = off, the default); the training time
(E-steps in, kNN monitoring off; an epoch trained twice across a resume counts once); and the prototype drift of
the last E-step that has one (``drift_nmi_k{k}`` in log.txt: NMI in percent between consecutive E-steps'
assignments; MoCo rows have none). The same columns on the validation split carry a ``val_`` prefix.

Validation split (with ``--train-per-class N``): ``--val-per-class M`` images of each class drawn (seeded by
``--val-seed``) from the training images the subset leaves out, so disjoint from every run's training images;
written once beside the subset and checked on every call. The factorial picks each method's better temperature on
it (the higher mean val_nmi + val_ari over seeds), never on the test split.

Resumable: runs go seed by seed (every variant at seed 0, then at seed 1, ...), so an interrupted grid already
holds complete pairs. Each run writes OUT_DIR/<variant>_seed<seed>.json (atomically) as soon as it is evaluated;
a rerun skips every run whose JSON parses, and continues an interrupted one from the newest checkpoint in its
EXP_ROOT/<variant>_seed<seed> (every run is started with ``--resume auto``). Nothing is mixed: a run folder, the
data subset and each JSON record the settings and the data fingerprint they were made with (``made_with.json``, the
JSON's ``settings``); a call with other settings or other data stops at start-up, before any run, naming what
differs. The summary (OUT_DIR/summary.json and the printed markdown) is rebuilt from the JSONs at the end of each
call: per variant mean +- sample standard deviation over seeds; per variant the paired difference to the baseline
with a 95 % Student-t interval (n - 1 degrees of freedom) and an exact sign-flip p; and, when the four factorial
cells ran, the factorial's contrasts and its decision rule (experiments/grid_stats.py). OUT_DIR/drift.png plots,
per variant with E-steps, the drift and the coarsest k's NMI with the training labels at every E-step (matplotlib;
skipped without it). OUT_DIR defaults to EXP_ROOT/results, never the checkout's committed experiments/results.

    python experiments/grid.py --train-per-class 2000 -- -b 128 --lr 0.06   # 20k images: ~9 min a run, 1 thread
    python experiments/grid.py --variants pcl,moco,reseed --seeds 0,1,2,3,4
    python experiments/grid.py --epochs 2 --exp-root /tmp/grid -- --width 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import numpy as np

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import (ROOT, as_json, check_made_with, cli, differences, fingerprint, fit_with_curve, hardware,
                   log_epochs, made_with, source_commit, write_json)
from grid_eval import evaluate, read_log, read_validation, write_subset
from grid_stats import T975, markdown, summarise, t_quantile  # noqa: F401 (T975, t_quantile: the tests')
from pcl import PCLError, checkpoint as ckpt_io
from pcl.config import build_pretrain_parser, parse_args, validate_pretrain_args
from pcl.data import DATASETS, data_settings, load_in_memory
from pcl.settings import parse_list

BASELINE = "moco"
#: what a finished run's JSON must hold (besides its per-shot SVM columns); anything less is run again
REQUIRED = ("variant", "seed", "settings", "train_seconds", "knn_top1", "nmi", "ami", "ari", "kmeans_acc")
#: the grid's rows: name -> main_pcl flags after the config and the overrides (so they win); {epochs} and
#: {batch_x4/8/16} are the resolved config's epochs and 4/8/16 x its batch. A new row is one line here.
VARIANTS: dict[str, list[str]] = {
    "pcl": [],
    "moco": ["--warmup-epoch", "{epochs}"],
    "reseed": ["--kmeans-reseed"],
    "proto_w001": ["--proto-weight", "0.01"],
    "k_large": ["--num-cluster", "{batch_x4},{batch_x8},{batch_x16}"],
    "unique": ["--unique-prototypes"],
    "moco_t03": ["--warmup-epoch", "{epochs}", "--temperature", "0.3"],
    "moco_t05": ["--warmup-epoch", "{epochs}", "--temperature", "0.5"],
    "pcl_t05": ["--temperature", "0.5"],
    "bank": ["--estep-features", "bank"],
    "bank_warm": ["--estep-features", "bank", "--kmeans-init", "previous"],
    "bank_key": ["--estep-features", "bank", "--bank-views", "key"],
    # ProPos's PCL setting (config/pcl_cifar20_r18_config.json of Hzzone/ProPos): InfoNCE at T = 1.0 (also phi's
    # mean), ProtoNCE weight 0.01, no duplicate positives, warm-up 5 % of the epochs (50 of 1000); against MoCo at
    # the same T (docs/results/factorial.md, stage C)
    "propos": ["--unique-prototypes", "--temperature", "1.0", "--proto-weight", "0.01", "--warmup-epoch",
               "{warmup_5pct}"],
    "moco_t1": ["--warmup-epoch", "{epochs}", "--temperature", "1.0"],
}
#: the pre-registered 2 x 2 of docs/results/factorial.md: method -> its variants, the config's temperature first;
#: the control (MoCo) first. The temperatures are read from each variant's resolved settings.
FACTORIAL = {"moco": ("moco", "moco_t05"), "pcl": ("pcl", "pcl_t05")}
#: settings that say where a run lives and how it reports, not what it trains: left out of its comparison
OPERATIONAL = ("data", "config", "exp_dir", "resume", "overwrite", "no_progress", "print_freq", "save_freq", "debug",
               "seed_given", "local_rank", "workers", "prefetch_factor", "persistent_workers", "loader_timeout",
               "dist_timeout", "knn_max_bank_gb")


def variants(cfg: argparse.Namespace) -> dict[str, list[str]]:
    """The grid's rows for the resolved config ``cfg``: :data:`VARIANTS` with its placeholders filled (MoCo's
    warm-up is the config's epochs, propos's 5 % of them, k_large's k scale with its batch size)."""
    fill = {"epochs": cfg.epochs, "warmup_5pct": max(1, round(0.05 * cfg.epochs)),
            **{f"batch_x{m}": m * cfg.batch_size for m in (4, 8, 16)}}
    return {name: [flag.format(**fill) for flag in flags] for name, flags in VARIANTS.items()}


def run_name(variant: str, seed: int) -> str:
    """The stem of a run's JSON and exp dir: ``<variant>_seed<seed>``."""
    return f"{variant}_seed{seed}"


def read_finished(path: str) -> dict[str, Any] | None:
    """A run's JSON when it is complete (parses, holds every column); None when it must be (re)run."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or any(key not in record for key in REQUIRED):
        return None
    return record


def write_atomic(obj: dict[str, Any], path: str) -> None:
    """Write the JSON next to ``path`` and rename it into place: an interrupted write never leaves a JSON that
    parses but is cut short (a rerun would then skip a run it lacks)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    """The grid's own flags, parsed and checked (lists split, OUT_DIR defaulted to EXP_ROOT/results)."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "fmnist.yaml"))
    p.add_argument("--data", default=None, help="dataset folder (default: the config's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the config's epochs; its warm-up scales with it (12 epochs with 3 warm-up -> "
                        "36 with 9), MoCo's warm-up is all of them")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="train on the first N training images of each class (idx files written to "
                        "EXP_ROOT/data_<N>_per_class; the test split stays whole); MNIST-family configs only")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="with --train-per-class: a validation split of M images per class drawn from the other "
                        "training images (0: none; default 1000, or what the smallest class leaves when fewer); "
                        "every run is also evaluated on it")
    p.add_argument("--val-seed", type=int, default=0, help="the seed of the validation split's draw")
    p.add_argument("--variants", default="pcl,moco,reseed,proto_w001,k_large,unique,moco_t03,moco_t05",
                   help=f"comma-separated rows of the grid, of {','.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 2 for an interval; 3+ advised)")
    p.add_argument("--baseline", default=BASELINE, help="the variant the paired differences are taken against")
    p.add_argument("--shots", default="1,4", help="positives per class of the low-shot SVM columns")
    p.add_argument("--svm-runs", type=int, default=5, help="seeded low-shot draws per shot")
    p.add_argument("--svm-costs", default="0.1,1,10")
    p.add_argument("--linear-epochs", type=int, default=0, help="linear probe epochs (0: no linear column)")
    p.add_argument("--linear-lr", type=float, default=5.0)
    p.add_argument("--exp-root", default="exp/grid", help="each run trains in EXP_ROOT/<variant>_seed<seed>")
    p.add_argument("--out-dir", default=None, help="OUT_DIR/<variant>_seed<seed>.json per run, OUT_DIR/summary.json "
                                                   "(default EXP_ROOT/results)")
    p.add_argument("overrides", nargs="*", help="extra main_pcl flags for every run, after --")
    opts = p.parse_args(argv)
    opts.shots = parse_list(opts.shots, "--shots")
    opts.svm_costs = parse_list(opts.svm_costs, "--svm-costs", float)
    opts.seeds = parse_list(opts.seeds, "--seeds")
    opts.variants = [v for v in opts.variants.split(",") if v]
    opts.out_dir = opts.out_dir or os.path.join(opts.exp_root, "results")
    for flag, value, low in (("--epochs", opts.epochs, 1), ("--train-per-class", opts.train_per_class, 1),
                             ("--val-per-class", opts.val_per_class, 0), ("--svm-runs", opts.svm_runs, 1)):
        if value is not None and value < low:
            raise PCLError(f"{flag} {value}: must be >= {low}")
    unknown = [v for v in opts.variants + [opts.baseline] if v not in VARIANTS]
    if unknown:
        raise PCLError(f"unknown variant(s) {','.join(unknown)}: pick from {','.join(VARIANTS)}")
    return opts


def resolve(argv: list[str]) -> Any:
    """main_pcl's resolved settings for ``argv`` (its parser and checks: a bad flag is a PCLError here)."""
    return validate_pretrain_args(parse_args(build_pretrain_parser(), argv))


def resolve_data(opts: argparse.Namespace, common: list[str]) -> tuple[list[str], list[str], Any, str | None]:
    """The data of every run, checked before any run: (the data argument, the flags that go with it (expected
    images, epochs, warm-up), the resolved config, the subset folder or None). Refuses --train-per-class on a
    dataset that is not in MNIST-family idx files, and any dataset whose test split is not held in memory."""
    data = [opts.data] if opts.data else []
    cfg = resolve(common + data + opts.overrides)
    entry = DATASETS[cfg.dataset]
    if opts.train_per_class is not None and not (entry.in_memory and entry.takes_dir):
        raise PCLError(f"--train-per-class needs an MNIST-family dataset (idx files: mnist, fashion-mnist, kmnist); "
                       f"{opts.config} trains on --dataset {cfg.dataset}: drop --train-per-class, or give such a "
                       f"config")
    if not entry.in_memory:
        held = ",".join(n for n, e in DATASETS.items() if e.in_memory)
        raise PCLError(f"grid.py evaluates on a test split held in memory (--dataset {held}); {opts.config} trains "
                       f"on --dataset {cfg.dataset}, read from files: give a config of one of those")
    extra: list[str] = []
    subset = None
    if opts.train_per_class is not None:
        subset = write_subset(cfg.dataset, cfg.data, opts.train_per_class,
                              os.path.join(opts.exp_root, f"data_{opts.train_per_class}_per_class"),
                              opts.val_per_class, opts.val_seed)
        data, extra = [subset], ["--expect-images", str(opts.train_per_class * cfg.expect_classes)]
        cfg = resolve(common + data + extra + opts.overrides)
    if opts.epochs is not None:
        warmup = max(1, round(cfg.warmup_epoch * opts.epochs / cfg.epochs))
        extra += ["--epochs", str(opts.epochs), "--warmup-epoch", str(warmup),
                  "--save-freq", str(max(1, min(cfg.save_freq, opts.epochs // 2)))]
        cfg = resolve(common + data + extra + opts.overrides)
    return data, extra, cfg, subset


def plan(opts: argparse.Namespace, common: list[str], data: list[str], extra: list[str], grid: dict[str, list[str]],
         data_print: str, validation: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (seed, variant) run of the call, seed by seed: its names, its main_pcl argv and resolved settings, the
    record its run folder carries (``made_with``: what it trains, without where it lives, and the data's
    fingerprint) and the settings its JSON carries (the same plus the evaluation's, ``validation`` among them)."""
    runs = []
    for seed in opts.seeds:  # seed by seed: an interrupted grid already holds complete pairs
        for v in opts.variants:
            name = run_name(v, seed)
            exp_dir = os.path.join(opts.exp_root, name)
            flags = common + extra + ["--seed", str(seed)] + opts.overrides + grid[v]
            argv = common + data + extra + ["--seed", str(seed)] + opts.overrides + ["--exp-dir", exp_dir,
                                                                                     "--resume", "auto"] + grid[v]
            cfg = resolve(argv)
            made = {"resolved": {k: val for k, val in cfg.items() if k not in OPERATIONAL}, "flags": flags,
                    "data_fingerprint": data_print}
            settings = {"argv": argv, **made, "shots": opts.shots, "svm_runs": opts.svm_runs,
                        "svm_costs": opts.svm_costs, "linear_epochs": opts.linear_epochs, "linear_lr": opts.linear_lr,
                        "validation": validation}
            runs.append({"variant": v, "seed": seed, "name": name, "exp_dir": exp_dir, "argv": argv, "cfg": cfg,
                         "path": os.path.join(opts.out_dir, name + ".json"), "made_with": made,
                         "settings": settings})
    return runs


def check_plan(runs: list[dict[str, Any]], train_images: int) -> None:
    """Before any run starts: every variant that runs E-steps can cluster the training set (k <= its images),
    every finished JSON was made with this call's settings, and every run folder is new or holds this run."""
    for run in {r["variant"]: r for r in runs}.values():
        cfg = run["cfg"]
        if cfg.warmup_epoch < cfg.epochs and max(cfg.num_cluster) > train_images:
            raise PCLError(f"variant {run['variant']}: --num-cluster {','.join(map(str, cfg.num_cluster))}: k="
                           f"{max(cfg.num_cluster)} is larger than the {train_images} training images: drop it from "
                           f"--variants, or train on more images")
    for run in runs:
        run["done"] = read_finished(run["path"])
        if run["done"] is not None:
            check_same(run["done"]["settings"], run["settings"], run["path"])
        else:
            check_made_with(run["exp_dir"], run["made_with"], "a run", "delete it to train it again, or give "
                            "another --exp-root", loose=("resolved",), holds=holds_run)


def holds_run(exp_dir: str) -> bool:
    """Whether a run folder holds a run to protect: a checkpoint or a log line (a run that stopped before either
    holds nothing, and its folder may be claimed by other settings)."""
    return os.path.isfile(os.path.join(exp_dir, "log.txt")) or any(
        e.name.startswith("checkpoint") and e.name.endswith(".pth.tar") for e in os.scandir(exp_dir))


def factorial_cells(runs: list[dict[str, Any]]) -> dict[str, dict[str, str]] | None:
    """The factorial's cells {method: {temperature: variant}} when this call runs all four of its variants."""
    temps = {r["variant"]: f"{r['cfg'].temperature:g}" for r in runs}
    if not all(v in temps for vs in FACTORIAL.values() for v in vs):
        return None
    return {method: {temps[v]: v for v in vs} for method, vs in FACTORIAL.items()}


def main(argv: list[str] | None = None,
         train: Callable[[list[str]], tuple[dict[str, Any], dict[str, Any]]] = fit_with_curve) -> dict[str, Any]:
    """Run the missing runs of the grid, then summarise every finished one. Returns {'ran': names (re)made in this
    call, 'skipped': names found finished, 'summary': the summary, 'table': its markdown}. ``train`` is the
    pretraining call (``study.fit_with_curve``). Everything that can be checked is checked before the first run."""
    opts = parse_options(argv)
    common = ["-c", opts.config, "--no-progress", "--no-knn-eval"]
    data, extra, cfg, subset = resolve_data(opts, common)
    sets = load_in_memory(data_settings(cfg))
    sets.update(read_validation(subset, cfg.image_size) if subset else {})
    validation = {"per_class": int(np.bincount(sets["val_labels"]).min()) if "val" in sets else 0,
                  "seed": opts.val_seed, "images": len(sets.get("val_labels", []))}
    if not validation["images"]:
        print("grid: no validation split (it is drawn from the training images that --train-per-class leaves out)")
    runs = plan(opts, common, data, extra, variants(cfg), fingerprint(sets), validation)
    check_plan(runs, len(sets["train"]))
    print(f"grid: {len(runs)} runs in {opts.exp_root}, results in {opts.out_dir}", flush=True)
    ran, skipped = [], []
    records: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in opts.variants}
    for run in runs:
        name, v, seed = run["name"], run["variant"], run["seed"]
        if run["done"] is not None:
            records[v][seed] = run["done"]
            skipped.append(name)
            continue
        made_with(run["exp_dir"], run["made_with"])
        print(f"\n== {name}: {' '.join(variants(cfg)[v]) or '(the config)'}", flush=True)
        fitted = train(run["argv"])[1]
        record: dict[str, Any] = {"variant": v, "seed": seed, "flags": variants(cfg)[v], "settings": run["settings"],
                                  "exp_dir": run["exp_dir"], "wall_seconds": fitted["wall_seconds"],
                                  "commit": source_commit(),
                                  **read_log(run["exp_dir"])}
        record.update(evaluate(os.path.join(run["exp_dir"], ckpt_io.LAST), sets, seed, opts))
        write_atomic(record, run["path"])
        records[v][seed] = record
        ran.append(name)
        print(json.dumps({k: val for k, val in record.items() if k != "settings"}), flush=True)
    summary = summarise(records, opts.baseline, factorial_cells(runs))
    text = markdown(summary, opts.baseline)
    hw = hardware()
    print(f"\nHardware: {hw}\nConfig: {opts.config}, epochs {cfg.epochs} (warm-up {cfg.warmup_epoch}), overrides "
          f"{opts.overrides}\n\n{text}")
    write_json({"hardware": hw, "config": opts.config, "epochs": cfg.epochs, "warmup_epoch": cfg.warmup_epoch,
                "overrides": opts.overrides, "variants": {v: variants(cfg)[v] for v in opts.variants},
                "seeds": opts.seeds, "baseline": opts.baseline, "exp_root": opts.exp_root,
                "data_fingerprint": runs[0]["made_with"]["data_fingerprint"] if runs else None,
                "validation": validation,
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
    """A finished run counts only when it was made with the settings this call would use: what it trains (its
    resolved settings and flags, its exp dir aside), the data's fingerprint and the evaluation's settings; otherwise
    stop rather than average different experiments, naming what differs and the JSON to delete (or pick another
    --out-dir)."""
    def strip(settings: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in settings.items() if k != "argv"}

    diff = differences(strip(found), strip(as_json(wanted)), loose=("resolved",))
    if diff:
        raise SystemExit(f"error: {path} was made with other settings than this grid's ({'; '.join(diff[:3])}"
                         f"{' ...' if len(diff) > 3 else ''}); delete it to rerun that run, or use another --out-dir")


if __name__ == "__main__":
    cli(main)
