#!/usr/bin/env python
"""What the E-step costs per epoch with each way of getting its features: ``pass`` (the official centre-crop
feature pass), ``bank`` (the keys the training steps computed) and ``bank_warm`` (bank + k-means from the previous
E-step's centroids), on the same pretraining config.

Each mode is one pretraining run (``main_pcl.py -c CONFIG`` plus ``--epochs``/``--warmup-epoch`` and the mode's
flags, in a process of its own, kNN monitoring off), read back from its log.txt: per E-step epoch the E-step
seconds (features + k-means + phi; bank_warm's comparison with a cold start, ``--kmeans-warm-check 1``, is
logged apart and left out), the feature seconds, each granularity's k-means seconds and objective, and the
epoch's wall seconds; bank_warm also gives the cold start's objective and NMI against the warm assignment on the
same features. Run it alone on the cores.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_estep_modes.py --data /usr/share/datasets/fashion-mnist \
        --json benchmarks/results/estep_modes_fmnist.json            # configs/fmnist.yaml, 6 epochs: ~20 min
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import hardware, write_json  # noqa: E402

MODES = {"pass": [], "bank": ["--estep-features", "bank"],
         "bank_warm": ["--estep-features", "bank", "--kmeans-init", "previous", "--kmeans-warm-check", "1"]}


def epochs_of(log: str) -> list[dict]:
    """The last line of every epoch in a log.txt (a restart repeats epochs)."""
    rows: dict[int, dict] = {}
    with open(log) as f:
        for line in f:
            row = json.loads(line)
            rows[int(row["epoch"])] = row
    return [rows[e] for e in sorted(rows)]


def summarise(rows: list[dict], ks: list[int]) -> dict:
    """Means over the E-step epochs (the first E-step apart: it may encode rows the bank does not hold yet)."""
    esteps = [r for r in rows if "estep_seconds" in r]
    later = esteps[1:] or esteps

    def mean(key: str, of: list[dict]) -> float:
        values = [r[key] for r in of if key in r]
        return sum(values) / len(values) if values else float("nan")

    check = [r.get("warm_check_seconds", 0.0) for r in later]
    estep = [r["estep_seconds"] - c for r, c in zip(later, check)]
    epoch = [r["seconds"] - c for r, c in zip(later, check)]
    out = {"esteps": len(esteps), "first_estep_seconds": esteps[0]["estep_seconds"] if esteps else None,
           "first_estep_filled": esteps[0].get("estep_filled", 0) if esteps else None,
           "estep_seconds": sum(estep) / len(estep), "epoch_seconds": sum(epoch) / len(epoch),
           "feature_seconds": mean("estep_feature_seconds", later),
           "warmup_epoch_seconds": mean("seconds", [r for r in rows if "estep_seconds" not in r])}
    out["estep_share_pct"] = 100 * out["estep_seconds"] / out["epoch_seconds"]
    for k in ks:
        out[f"kmeans_seconds_k{k}"] = mean(f"kmeans_seconds_k{k}", later)
        out[f"kmeans_obj_k{k}"] = mean(f"kmeans_obj_k{k}", later)
        if any(f"kmeans_obj_cold_k{k}" in r for r in later):
            out[f"kmeans_obj_cold_k{k}"] = mean(f"kmeans_obj_cold_k{k}", later)
            out[f"nmi_warm_cold_k{k}"] = mean(f"nmi_warm_cold_k{k}", later)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "fmnist.yaml"))
    p.add_argument("--data", default=None, help="DIR for the config (default: the config's own)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--warmup-epoch", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--exp-root", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more main_pcl flags after --")
    opts = p.parse_args(argv)
    root = opts.exp_root or tempfile.mkdtemp(prefix="estep_modes_")
    out = {"hardware": hardware(), "config": opts.config, "epochs": opts.epochs, "warmup_epoch": opts.warmup_epoch,
           "threads": os.environ.get("OMP_NUM_THREADS"), "modes": {}}
    for mode in opts.modes.split(","):
        exp = os.path.join(root, mode)
        cmd = [sys.executable, os.path.join(ROOT, "main_pcl.py"), "-c", opts.config, "--epochs", str(opts.epochs),
               "--warmup-epoch", str(opts.warmup_epoch), "--knn-every", "0", "--no-knn-eval", "--exp-dir", exp,
               "--overwrite", "--no-progress", *MODES[mode], *opts.extra, *([opts.data] if opts.data else [])]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        rows = epochs_of(os.path.join(exp, "log.txt"))
        ks = sorted(int(key[len("kmeans_obj_k"):]) for key in rows[-1] if key.startswith("kmeans_obj_k"))
        out["modes"][mode] = summarise(rows, ks)
    print(f"\n{out['hardware']}; {opts.config}, {opts.epochs} epochs (E-steps from {opts.warmup_epoch}), OMP threads "
          f"{out['threads']}\n")
    print("| mode | E-step s (mean, after the first) | of which features s | epoch s | E-step share | first E-step s "
          "(rows encoded) |\n|---|---|---|---|---|---|")
    for mode, r in out["modes"].items():
        print(f"| {mode} | {r['estep_seconds']:.2f} | {r['feature_seconds']:.2f} | {r['epoch_seconds']:.1f} | "
              f"{r['estep_share_pct']:.1f} % | {r['first_estep_seconds']:.2f} ({r['first_estep_filled']}) |")
    print("\n| mode | " + " | ".join(f"k={k} s / objective" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for mode, r in out["modes"].items():
        cells = [f"{r[f'kmeans_seconds_k{k}']:.2f} / {r[f'kmeans_obj_k{k}']:.4f}" for k in ks]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    warm = out["modes"].get("bank_warm", {})
    if any(f"nmi_warm_cold_k{k}" in warm for k in ks):
        print("\nbank_warm, the same E-steps from a cold start: " + "; ".join(
            f"k={k}: objective {warm[f'kmeans_obj_cold_k{k}']:.4f} (warm {warm[f'kmeans_obj_k{k}']:.4f}), NMI(warm, "
            f"cold) {warm[f'nmi_warm_cold_k{k}']:.1f} %" for k in ks))
    if opts.json:
        write_json(out, opts.json)
    return out


if __name__ == "__main__":
    main()
