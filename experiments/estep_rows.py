#!/usr/bin/env python
"""What a cheaper E-step costs in quality: grid rows of E-step variants (``--estep-features bank``, ``--kmeans-init
previous``, ...) paired by seed against a baseline variant trained elsewhere (the official E-step, ``pcl``), and
what each E-step took.

Reads the per-run JSONs ``grid.py`` wrote (``DIR/<variant>_seed<seed>.json``) from ``--baseline-dir`` (the
baseline's) and every ``--dir`` (the variants'), and each run's log.txt (its ``exp_dir``, relative to
``--runs-root``) for the E-step seconds. Per variant: the paired difference to the baseline over their common seeds
(mean, 95 % t interval, exact sign-flip p: ``grid_stats.difference_stats``) for NMI, ARI, k-means accuracy, kNN and
the 1-/4-shot SVM mAP; the mean E-step seconds over the E-steps after the first (the first may encode rows the bank
does not hold yet) and their share of the epoch's seconds; the commits the rows ran at. ``--goal COL=LOW`` marks a
variant whose interval's lower bound is below LOW on COL (issue 37: NMI -0.01, 1-shot mAP -1.0).

    python experiments/estep_rows.py --baseline-dir experiments/results/factorial/stage_a --baseline pcl \
        --dir experiments/results/estep_bank/pair --dir experiments/results/estep_bank/key_only \
        --runs-root /path/to/the/grid/checkout --out exp/results/estep_rows.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

from study import cli, default_out, write_json
from grid_stats import difference_stats, mean_sd

METRICS = ("nmi", "ari", "kmeans_acc", "knn_top1", "svm_map_1shot", "svm_map_4shot")
GOALS = {"nmi": -0.01, "svm_map_1shot": -1.0}


def load_rows(folder: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{variant: {seed: record}} of the grid JSONs in ``folder`` (its summary.json left out)."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*_seed*.json"))):
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        rows.setdefault(rec["variant"], {})[int(rec["seed"])] = rec
    return rows


def estep_cost(exp_dir: str) -> dict[str, float] | None:
    """Mean E-step seconds (after the first E-step), the epoch seconds of those epochs and the E-step's share, from
    a run's log.txt (the last line of each epoch); None without a log or an E-step."""
    path = os.path.join(exp_dir, "log.txt")
    if not os.path.exists(path):
        return None
    epochs: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            epochs[int(entry["epoch"])] = entry
    later = [epochs[e] for e in sorted(epochs) if "estep_seconds" in epochs[e]][1:]
    if not later:
        return None
    estep = [e["estep_seconds"] - e.get("warm_check_seconds", 0.0) for e in later]
    seconds = [e["seconds"] - e.get("warm_check_seconds", 0.0) for e in later]
    return {"estep_seconds": sum(estep) / len(estep), "epoch_seconds": sum(seconds) / len(seconds),
            "estep_share_pct": 100 * sum(estep) / sum(seconds)}


def compare(base: dict[int, dict[str, Any]], rows: dict[str, dict[int, dict[str, Any]]], runs_root: str,
            goals: dict[str, float]) -> dict[str, Any]:
    """Per variant: paired differences to ``base`` per metric, the E-step cost (mean over seeds), the commits, and
    the goals its intervals miss."""
    out: dict[str, Any] = {}
    for variant, runs in rows.items():
        seeds = sorted(set(runs) & set(base))
        diffs = {m: difference_stats([runs[s][m] - base[s][m] for s in seeds], seeds)
                 for m in METRICS if seeds and all(m in runs[s] and m in base[s] for s in seeds)}
        costs = [c for s in sorted(runs) if (c := estep_cost(os.path.join(runs_root, runs[s]["exp_dir"])))]
        cost = {k: mean_sd([c[k] for c in costs])["mean"] for k in costs[0]} if costs else None
        missed = [m for m, low in goals.items() if m in diffs and diffs[m]["ci95"] is not None
                  and diffs[m]["ci95"][0] < low]
        out[variant] = {"seeds": seeds, "diffs": diffs, "estep": cost, "missed_goals": missed,
                        "commits": sorted({runs[s].get("commit", "unknown") for s in runs})}
    return out


def markdown(result: dict[str, Any], baseline: str, base_cost: dict[str, float] | None) -> str:
    """One row per variant: each metric's mean difference [95 % t] and p, then the E-step seconds and share."""
    head = "| variant - " + baseline + " | seeds | " + " | ".join(METRICS) + " | E-step s (share) | commits |"
    lines = [head, "|" + "---|" * (len(METRICS) + 4)]
    if base_cost:
        lines.append(f"| {baseline} itself | | " + " | ".join([""] * len(METRICS)) +
                     f" | {base_cost['estep_seconds']:.1f} ({base_cost['estep_share_pct']:.1f} %) | |")
    for variant, r in result.items():
        cells = []
        for m in METRICS:
            d = r["diffs"].get(m)
            if d is None:
                cells.append("")
                continue
            scale = 1 if m.startswith(("svm", "knn")) else 1000  # NMI/ARI/acc in thousandths
            ci = d["ci95"]
            text = f"{d['mean'] * scale:+.1f}" + (f" [{ci[0] * scale:+.1f}, {ci[1] * scale:+.1f}]" if ci else "")
            cells.append(text + (f" p={d['p_sign_flip']:.2f}" if d["p_sign_flip"] is not None else ""))
        cost = r["estep"]
        cost_text = f"{cost['estep_seconds']:.1f} ({cost['estep_share_pct']:.1f} %)" if cost else ""
        lines.append(f"| {variant} | {','.join(map(str, r['seeds']))} | " + " | ".join(cells) +
                     f" | {cost_text} | {', '.join(r['commits'])} |")
    lines.append("")
    lines.append("NMI, ARI and k-means accuracy in thousandths (x 1000), kNN and SVM mAP in points.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--baseline-dir", required=True)
    p.add_argument("--baseline", default="pcl")
    p.add_argument("--dir", action="append", required=True, help="a folder of variant rows (repeatable)")
    p.add_argument("--runs-root", default=".", help="where the runs' exp_dir paths start (their log.txt)")
    p.add_argument("--out", default=default_out("estep_rows.json"))
    opts = p.parse_args(argv)
    base = load_rows(opts.baseline_dir).get(opts.baseline)
    if not base:
        from pcl import PCLError
        raise PCLError(f"{opts.baseline_dir} holds no {opts.baseline}_seed*.json rows")
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for folder in opts.dir:
        for variant, runs in load_rows(folder).items():
            rows[f"{variant} ({os.path.basename(os.path.normpath(folder))})"] = runs
    result = compare(base, rows, opts.runs_root, GOALS)
    base_costs = [c for s in sorted(base) if (c := estep_cost(os.path.join(opts.runs_root, base[s]["exp_dir"])))]
    base_cost = {k: sum(c[k] for c in base_costs) / len(base_costs) for k in base_costs[0]} if base_costs else None
    text = markdown(result, opts.baseline, base_cost)
    print(text)
    out = {"baseline": opts.baseline, "baseline_estep": base_cost, "variants": result, "goals": GOALS,
           "markdown": text}
    write_json(out, opts.out)
    return out


if __name__ == "__main__":
    cli(main)
