#!/usr/bin/env python
"""PAUC ablation on the demo set, same budget for every row: PCL, PCL + each term, PAUC (all three).

Each row pretrains with configs/demo.yaml (overridable after ``--``) and reports kNN top-1 of the learned
backbone on the held-out test renders and the intra-cluster spread of the final momentum features: k-means
(the run's granularities) on them, then the mean Euclidean distance of each sample to its L2-normalised
centroid (the "coagulation" PAUC targets: smaller = samples packed tighter around their prototype).
Writes JSON to --out and prints a markdown table. Run it alone on the machine.

    python experiments/pauc_ablation.py --epochs 20 --warmup-epoch 5
"""

import argparse
import json
import os
import time

import torch

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import ROOT, cli, default_out, hardware, write_json
from pcl import PCLError
from pcl.checkpoint import LAST, load_checkpoint, load_model_state
from pcl.cluster import run_kmeans
from pcl.config import build_pretrain_parser, parse_args, validate_pretrain_args
from pcl.data import build_pretrain_data, data_settings
from pcl.engine import fit
from pcl.estep import compute_features
from pcl.model import MoCo

ROWS = {"PCL": [], "PCL + align": ["--pauc", "--pauc-uniform", "0", "--pauc-corr", "0"],
        "PCL + uniform": ["--pauc", "--pauc-align", "0", "--pauc-corr", "0"],
        "PCL + corr": ["--pauc", "--pauc-align", "0", "--pauc-uniform", "0"],
        "PAUC (all three)": ["--pauc"]}


@torch.no_grad()
def spread(args) -> dict:
    """Mean distance of the final momentum features to their k-means centroid, per granularity."""
    ckpt = load_checkpoint(os.path.join(args.exp_dir, LAST))
    model = MoCo(args.arch, args.low_dim, args.pcl_r, args.moco_m, args.mlp, args.width, args.stem, 8)
    load_model_state(model, ckpt["state_dict"], args.exp_dir)
    data = build_pretrain_data(data_settings(args.replace(batch_size=128)))
    feats = compute_features(model, data.eval_loader, torch.device("cpu"), data.num_samples, progress=False)
    result = run_kmeans(feats, args.num_cluster, args.temperature, niter=args.kmeans_niter, nredo=1)
    return {k: float((feats - c[a]).norm(dim=1).mean()) for k, a, c in zip(args.num_cluster, result.im2cluster,
                                                                        result.centroids)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--warmup-epoch", type=int, default=5)
    p.add_argument("--rows", default=",".join(ROWS), help="which rows, comma-separated")
    p.add_argument("--out", default=default_out("pauc_ablation.json"))
    p.add_argument("--exp-root", default="exp/pauc_ablation")
    p.add_argument("overrides", nargs="*", help="extra main_pcl flags, after --")
    opts = p.parse_args(argv)
    results = []
    for name in opts.rows.split(","):
        argv = ["-c", os.path.join(ROOT, "configs", "demo.yaml"), "--epochs", str(opts.epochs), "--warmup-epoch",
                str(opts.warmup_epoch), "--no-progress", "--no-knn-eval", "--knn-every", str(opts.epochs),
                "--save-freq", str(opts.epochs), "--exp-dir", os.path.join(opts.exp_root, name.replace(" ", "_")),
                *ROWS[name], *opts.overrides]
        args = validate_pretrain_args(parse_args(build_pretrain_parser(), argv))
        start = time.perf_counter()
        try:
            stats = fit(args)
        except PCLError as e:  # e.g. a diverged run: record it and go on with the next row
            results.append({"name": name, "argv": argv, "seconds": round(time.perf_counter() - start, 1),
                            "failed": str(e)})
            print(json.dumps(results[-1]), flush=True)
            continue
        row = {"name": name, "argv": argv, "seconds": round(time.perf_counter() - start, 1),
               "knn_top1": round(stats["knn_top1"], 2), "spread": spread(args),
               "final_losses": {k: round(v, 4) for k, v in stats.items() if k.startswith("loss")}}
        results.append(row)
        print(json.dumps(row), flush=True)
    hw = hardware()
    ks = next((list(r["spread"]) for r in results if "spread" in r), [])
    print(f"\nPAUC ablation on the demo set, {opts.epochs} epochs (warm-up {opts.warmup_epoch}), {hw}")
    print("| run | kNN top-1 | " + " | ".join(f"spread k={k}" for k in ks) + " | time |")
    print("|---|---|" + "---|" * len(ks) + "---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['name']} | failed: {r['failed'][:90]} |" + " |" * len(ks) + f" {r['seconds'] / 60:.1f} min |")
            continue
        print(f"| {r['name']} | {r['knn_top1']:.2f}% | " + " | ".join(f"{r['spread'][k]:.4f}" for k in ks)
              + f" | {r['seconds'] / 60:.1f} min |")
    return write_json({"hardware": hw, "epochs": opts.epochs, "warmup_epoch": opts.warmup_epoch, "rows": results},
                      opts.out)


if __name__ == "__main__":
    cli(main)
