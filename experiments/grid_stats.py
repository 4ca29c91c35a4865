"""The statistics of the seed grids (``grid.py``): paired differences over seeds with a 95 % Student-t interval and an
exact sign-flip permutation test, and the pre-registered 2 x 2 factorial of docs/results/factorial.md (method x
temperature) with its decision rule.

Pairing: the same seed means the same initialisation, data order, augmentations, k-means init and SVM draws, so the
difference of two runs of a seed removes the noise they share. For n paired differences d:

- the t interval: mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n) (sd with ddof 1);
- the sign-flip test: under the null that each difference is as likely +d_i as -d_i, the two-sided p is the share
  of the 2^n sign vectors s with |sum s_i d_i| >= |sum d_i|, every vector counted (exact, not sampled; the
  observed one included, so p >= 2 / 2^n: 0.25 at 3 seeds, 0.031 at 6).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: t_{0.975, dof} for dof = 1..30, used only when scipy is missing (scipy comes with scikit-learn)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
#: the sign-flip test enumerates 2^n vectors: exact up to this many pairs (65,536 vectors), None beyond
MAX_FLIP_PAIRS = 16
#: the pre-registered metrics of the factorial (test split), in the order of its table
FACTORIAL_METRICS = ("nmi", "ari", "kmeans_acc", "svm_map_1shot", "svm_map_4shot", "knn_top1")
#: what picks each method's better temperature: the mean over seeds of their sum on the validation split
SELECT_BY = ("val_nmi", "val_ari")


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


def mean_sd(values: list[float]) -> dict[str, Any]:
    """n, mean and the sample standard deviation (ddof 1; None for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(a), "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else None}


def sign_flip_p(diffs: list[float]) -> float | None:
    """The exact two-sided sign-flip permutation p of paired differences (float64): the share of the 2^n sign
    vectors whose |signed sum| reaches the observed |sum| (ties within 1e-12 of the scale count as reaching it).
    None for no pairs or more than :data:`MAX_FLIP_PAIRS`."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0 or n > MAX_FLIP_PAIRS:
        return None
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # 2^n x n, every vector once
    sums = np.abs(signs @ d)
    tol = 1e-12 * max(float(np.abs(d).sum()), 1e-300)
    return float(np.mean(sums >= abs(d.sum()) - tol))


def difference_stats(diffs: list[float], seeds: list[int]) -> dict[str, Any]:
    """n, mean, sd, the 95 % t interval (None below two pairs), the sign-flip p, the seeds and the differences."""
    stats = mean_sd(diffs)
    if stats["n"] > 1:
        half = t_quantile(stats["n"] - 1) * stats["sd"] / math.sqrt(stats["n"])
        stats["ci95"] = [stats["mean"] - half, stats["mean"] + half]
    else:
        stats["ci95"] = None
    return {**stats, "p_sign_flip": sign_flip_p(diffs), "seeds": seeds, "diffs": [float(x) for x in diffs]}


def paired(runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]], cols: list[str]) -> dict[str, Any]:
    """Per column, the variant minus the baseline on the seeds both have: :func:`difference_stats`."""
    seeds = sorted(set(runs) & set(base))
    out: dict[str, Any] = {}
    for col in cols:
        both = [s for s in seeds if col in runs[s] and col in base[s]]
        if both:
            out[col] = difference_stats([runs[s][col] - base[s][col] for s in both], both)
    return out


def contrast(records: dict[str, dict[int, dict[str, Any]]], terms: dict[str, float], seeds: list[int],
             metrics: tuple[str, ...]) -> dict[str, Any]:
    """A per-seed linear contrast of runs: for each metric, sum over ``terms`` {variant: weight} of weight x the
    run's value at a seed, then :func:`difference_stats` over the ``seeds`` where every term's run has the metric."""
    out: dict[str, Any] = {}
    for m in metrics:
        have = [s for s in seeds if all(m in records[v][s] for v in terms)]
        if have:
            out[m] = difference_stats([sum(w * records[v][s][m] for v, w in terms.items()) for s in have], have)
    return out


def better_temperature(records: dict[str, dict[int, dict[str, Any]]], by_t: dict[str, str],
                       seeds: list[int]) -> dict[str, Any] | None:
    """Of one method's cells {temperature: variant}, the one with the higher mean over ``seeds`` of
    val_nmi + val_ari (ties: the first listed, the config's temperature). None when a cell lacks the validation
    columns (a grid without --train-per-class has no validation split)."""
    scores = {}
    for t, v in by_t.items():
        if not all(all(k in records[v][s] for k in SELECT_BY) for s in seeds):
            return None
        scores[t] = float(np.mean([sum(records[v][s][k] for k in SELECT_BY) for s in seeds]))
    best = max(scores, key=lambda t: (scores[t], -list(by_t).index(t)))
    return {"temperature": best, "variant": by_t[best], "val_nmi_plus_ari": scores}


def decide(diff: dict[str, Any]) -> dict[str, Any]:
    """The pre-registered rule on PCL - MoCo at each method's better temperature: 'PCL improves clustering over
    MoCo' only when the 95 % t interval lies above 0 on both NMI and ARI; 'MoCo clusters better' when both lie
    below 0; else 'not shown'. The sign-flip p is reported beside it, and a disagreement (p >= 0.05 where the
    interval excludes 0) is stated."""
    cis = {m: (diff.get(m) or {}).get("ci95") for m in ("nmi", "ari")}
    if any(ci is None for ci in cis.values()):
        return {"verdict": "not decidable: fewer than two seeds with NMI and ARI in every cell", "supported": None}
    if all(ci[0] > 0 for ci in cis.values()):
        verdict, supported = "PCL improves clustering over MoCo (both intervals above 0)", True
    elif all(ci[1] < 0 for ci in cis.values()):
        verdict, supported = "MoCo clusters better than PCL (both intervals below 0)", False
    else:
        open_ = [m.upper() for m, ci in cis.items() if ci[0] <= 0 <= ci[1]]
        verdict = (f"not shown: the interval includes 0 on {' and '.join(open_)}" if open_ else
                   "not shown: NMI and ARI move in opposite directions")
        supported = False
    p = {m: diff[m]["p_sign_flip"] for m in ("nmi", "ari")}
    weak = [m.upper() for m, ci in cis.items() if (ci[0] > 0 or ci[1] < 0) and (p[m] is None or p[m] >= 0.05)]
    if weak:
        verdict += f"; the sign-flip test does not confirm it on {' and '.join(weak)} (p >= 0.05)"
    return {"verdict": verdict, "supported": supported, "p_sign_flip": p, "ci95": cis}


def factorial(records: dict[str, dict[int, dict[str, Any]]], cells: dict[str, dict[str, str]],
              metrics: tuple[str, ...] = FACTORIAL_METRICS) -> dict[str, Any] | None:
    """The 2 x 2 analysis of ``cells`` {method: {temperature: variant}} (control first, then treatment; in each,
    the config's temperature first), on the seeds where all four runs finished: the treatment - control contrast at
    each temperature, the interaction (treatment - control at the second temperature minus at the first, per
    seed), each method's better temperature on validation and the contrast between them, and the rule's verdict.
    None when a cell has no run or the cells share no seed."""
    (control, c_t), (treat, t_t) = cells.items()
    variants = [v for by_t in cells.values() for v in by_t.values()]
    if any(not records.get(v) for v in variants):
        return None
    seeds = sorted(set.intersection(*(set(records[v]) for v in variants)))
    if not seeds:
        return None
    low, high = list(c_t)
    out: dict[str, Any] = {"cells": cells, "seeds": seeds, "metrics": list(metrics), "contrasts": {}}
    for t in (high, low):
        out["contrasts"][f"{treat} - {control} at T = {t}"] = contrast(records, {t_t[t]: 1.0, c_t[t]: -1.0}, seeds,
                                                                       metrics)
    out["contrasts"]["interaction"] = contrast(
        records, {t_t[high]: 1.0, c_t[high]: -1.0, t_t[low]: -1.0, c_t[low]: 1.0}, seeds, metrics)
    picks = {m: better_temperature(records, by_t, seeds) for m, by_t in cells.items()}
    out["better_temperature"] = picks
    if any(p is None for p in picks.values()):
        out["decision"] = {"verdict": "not decidable: no validation columns (run the grid with --train-per-class)",
                           "supported": None}
        return out
    name = f"{treat} (T = {picks[treat]['temperature']}) - {control} (T = {picks[control]['temperature']})"
    chosen = contrast(records, {picks[treat]["variant"]: 1.0, picks[control]["variant"]: -1.0}, seeds, metrics)
    out["contrasts"][f"better T: {name}"] = chosen
    out["decision"] = {"contrast": f"better T: {name}", **decide(chosen)}
    return out


def factorial_markdown(result: dict[str, Any] | None, formats: dict[str, tuple[str, str]]) -> str:
    """The factorial as markdown: one row per contrast, per metric mean [95 % t] (p), then each method's better
    temperature and the verdict. ``formats`` {metric: (column title, format)}; '' when there is no factorial."""
    if result is None:
        return ""
    cols = [m for m in result["metrics"] if m in formats]
    lines = [f"Factorial ({', '.join(result['cells'])} x T; seeds {result['seeds']}), paired by seed: mean "
             f"[95 % t interval] (exact sign-flip p):", "",
             "| contrast | seeds | " + " | ".join(formats[m][0] for m in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name, stats in result["contrasts"].items():
        cells = []
        for m in cols:
            s, fmt = stats.get(m), formats[m][1]
            if s is None:
                cells.append("-")
                continue
            ci = "" if s["ci95"] is None else f" [{fmt.format(s['ci95'][0])}, {fmt.format(s['ci95'][1])}]"
            p = "" if s["p_sign_flip"] is None else f" (p {s['p_sign_flip']:.3f})"
            cells.append(("+" if s["mean"] >= 0 else "") + fmt.format(s["mean"]) + ci + p)
        n = max((s["n"] for s in stats.values()), default=0)
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
    for method, pick in result["better_temperature"].items():
        if pick is not None:
            scores = ", ".join(f"T = {t}: {v:.4f}" for t, v in pick["val_nmi_plus_ari"].items())
            lines.append(f"- better temperature of {method} (mean validation NMI + ARI): T = {pick['temperature']} "
                         f"({scores})")
    lines.append(f"- decision rule: {result['decision']['verdict']}")
    return "\n".join(lines)


def columns(records: list[dict[str, Any]]) -> list[str]:
    """The numeric columns the runs hold (evaluation, time, drift), in a fixed order: first seen first."""
    skip = {"seed", "epochs_logged", "drift_epoch", "eval_seconds", "wall_seconds", "final_loss"}
    out: list[str] = []
    for r in records:
        out += [k for k, v in r.items() if k not in skip and k not in out and isinstance(v, (int, float))
                and not isinstance(v, bool)]
    return out


def summarise(records: dict[str, dict[int, dict[str, Any]]], baseline: str,
              cells: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """The summary of finished runs {variant: {seed: record}}: per variant mean/sd per column, per variant other
    than the baseline its paired differences to it, and with ``cells`` (method -> {temperature: variant}) the
    factorial (``factorial``; None when a cell has no run)."""
    flat = [r for runs in records.values() for r in runs.values()]
    cols = columns(flat)
    per_variant = {v: {c: mean_sd([r[c] for r in runs.values() if c in r]) for c in cols
                       if any(c in r for r in runs.values())} for v, runs in records.items() if runs}
    diffs = {v: paired(runs, records[baseline], cols) for v, runs in records.items()
             if v != baseline and runs and records.get(baseline)}
    out = {"columns": cols, "per_variant": per_variant, "paired_vs_" + baseline: diffs}
    if cells:
        out["factorial"] = factorial(records, cells)
    return out


TABLE = [("kNN top-1", "knn_top1", "{:.2f}"), ("linear top-1", "linear_top1", "{:.2f}"), ("NMI", "nmi", "{:.3f}"),
         ("AMI", "ami", "{:.3f}"), ("ARI", "ari", "{:.3f}"), ("k-means acc", "kmeans_acc", "{:.3f}")]


def table_columns(cols: list[str]) -> list[tuple[str, str, str]]:
    """The markdown tables' columns that the runs hold: the evaluation's on the test split, the SVM shots (C picked
    on test), drift, training time."""
    shots = [(f"SVM mAP {c[len('svm_map_'):-len('shot')]}-shot", c, "{:.1f}") for c in cols
             if c.startswith("svm_map_") and c.endswith("shot") and c[len("svm_map_"):-len("shot")].isdigit()]
    tail = [("drift NMI % (mean over k)", "drift_nmi_mean", "{:.1f}"), ("train s", "train_seconds", "{:.0f}")]
    return [c for c in TABLE + shots + tail if c[1] in cols]


def cell_text(s: dict[str, Any] | None, fmt: str, signed: bool) -> str:
    """A table cell: '-', 'mean ± sd', or (``signed``) '+mean [lo, hi]'."""
    if s is None:
        return "-"
    if not signed:
        return fmt.format(s["mean"]) + (f" ± {fmt.format(s['sd'])}" if s["sd"] is not None else "")
    ci = "" if s["ci95"] is None else f" [{fmt.format(s['ci95'][0])}, {fmt.format(s['ci95'][1])}]"
    return ("+" if s["mean"] >= 0 else "") + fmt.format(s["mean"]) + ci


def markdown(summary: dict[str, Any], baseline: str) -> str:
    """Two markdown tables: mean +- sd over seeds per variant, and each variant minus the baseline (paired over
    seeds) with its 95 % interval; then the factorial's, when the summary has one."""
    cols = table_columns(summary["columns"])
    head = "| variant | seeds | " + " | ".join(name for name, _, _ in cols) + " |"
    rule = "|" + "---|" * (len(cols) + 2)
    lines = ["Mean ± sample sd over seeds:", "", head, rule]
    for v, stats in summary["per_variant"].items():
        n = max(s["n"] for s in stats.values())
        lines.append(f"| {v} | {n} | " + " | ".join(cell_text(stats.get(k), f, False) for _, k, f in cols) + " |")
    diffs = summary["paired_vs_" + baseline]
    lines += ["", f"Paired difference to {baseline} (same seed), mean [95 % t interval]:", "", head, rule]
    for v, stats in diffs.items():
        n = max((s["n"] for s in stats.values()), default=0)
        lines.append(f"| {v} | {n} | " + " | ".join(cell_text(stats.get(k), f, True) for _, k, f in cols) + " |")
    if not diffs:
        lines.append(f"(no pairs: {baseline} has no finished run among these seeds)")
    formats = {key: (name, fmt) for name, key, fmt in table_columns(FACTORIAL_METRICS)}
    text = factorial_markdown(summary.get("factorial"), formats)
    return "\n".join(lines + (["", text] if text else []))
