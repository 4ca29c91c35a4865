#!/usr/bin/env python
"""Learning benchmark on the built-in demo set: PCL vs MoCo-only (ProtoNCE off) with the same budget.

Runs ``main_pcl`` twice in this process on configs/demo.yaml (plus any overrides given after ``--``),
logs kNN top-1 of the learned backbone every ``--knn-every`` epochs, and prints the kNN-vs-time curve and
a final table (learned / random init / raw pixels). Writes JSON next to ``--out``.

    python experiments/learning_demo.py --epochs 60 -- --width 8
"""

import argparse
import os

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import ROOT, cli, default_out, fit_with_curve, hardware, write_json


def run(name: str, argv: list[str]) -> dict:
    stats, record = fit_with_curve(argv)
    return {"name": name, "argv": argv, "wall_seconds": record["wall_seconds"], "curve": record["curve"],
            "final": stats["knn"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--warmup-epoch", type=int, default=10, help="PCL's warm-up (InfoNCE only) epochs")
    p.add_argument("--knn-every", type=int, default=5)
    p.add_argument("--out", default=default_out("learning_demo.json"))
    p.add_argument("--exp-root", default="exp/bench_learning")
    p.add_argument("overrides", nargs="*", help="extra main_pcl flags, after --")
    opts = p.parse_args(argv)
    base = ["-c", os.path.join(ROOT, "configs", "demo.yaml"), "--epochs", str(opts.epochs), "--knn-every",
            str(opts.knn_every), "--no-progress", "--save-freq", str(opts.epochs), *opts.overrides]
    results = [
        run("PCL", base + ["--warmup-epoch", str(opts.warmup_epoch), "--exp-dir", f"{opts.exp_root}/pcl"]),
        run("MoCo only", base + ["--warmup-epoch", str(opts.epochs), "--exp-dir", f"{opts.exp_root}/moco"]),
    ]
    hw = hardware()
    print(f"\nHardware: {hw}\n")
    print("| method | epochs | train time | kNN top-1 learned | random init | raw pixels |")
    print("|---|---|---|---|---|---|")
    for r in results:
        f = r["final"]
        print(f"| {r['name']} | {opts.epochs} | {r['wall_seconds'] / 60:.1f} min | {f['learned']:.2f}% | "
              f"{f['random_init']:.2f}% | {f['raw_pixels']:.2f}% |")
    print("\nkNN top-1 vs training time (seconds):\n")
    print("| epoch | " + " | ".join(f"{r['name']} s | {r['name']} kNN" for r in results) + " |")
    print("|---|" + "---|---|" * len(results))
    for rows in zip(*(r["curve"] for r in results)):
        print(f"| {rows[0]['epoch']} | " + " | ".join(f"{c['train_seconds']} | {c['knn_top1']:.2f}%" for c in rows) + " |")
    return write_json({"hardware": hw, "epochs": opts.epochs, "results": results}, opts.out)


if __name__ == "__main__":
    cli(main)
