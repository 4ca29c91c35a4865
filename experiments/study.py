"""What every study driver in ``experiments/`` shares: one pretraining run with its learning curve, and the
hardware line and JSON writer of the speed benchmarks (``benchmarks/common.py``, re-exported here so that a study
result and a speed number name their hardware the same way).

A driver runs the library only through its public entry points: ``pcl.engine.fit`` on the arguments that
``pcl.config.parse_args(pcl.config.build_pretrain_parser(), argv)`` makes, and the evaluation protocols' own
functions; this module adds nothing but the bookkeeping a study needs around them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from common import hardware, use_cores, write_json  # noqa: E402

__all__ = ["RESULTS", "ROOT", "fit_with_curve", "hardware", "log_epochs", "use_cores", "write_json"]


def log_epochs(exp_dir: str) -> dict[int, dict[str, Any]]:
    """EXP_DIR/log.txt as {epoch: entry}, in epoch order. The log is appended to, so only the lines from the last
    start at epoch 0 count, and of an epoch repeated after a resume the last line wins."""
    with open(os.path.join(exp_dir, "log.txt")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    starts = [i for i, entry in enumerate(lines) if entry.get("epoch") == 0]
    epochs = {int(entry["epoch"]): entry for entry in lines[starts[-1] if starts else 0:]}
    return dict(sorted(epochs.items()))


def fit_with_curve(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pretrain with ``main_pcl`` flags in this process; returns (fit's stats, a record of the run): wall and
    training seconds (E-steps in, kNN monitoring out) and the learning curve read back from EXP_DIR/log.txt."""
    from pcl.config import build_pretrain_parser, parse_args
    from pcl.engine import fit

    args = parse_args(build_pretrain_parser(), argv)
    start = time.perf_counter()
    stats = fit(args)
    wall = time.perf_counter() - start
    curve, elapsed = [], 0.0
    with open(os.path.join(args.exp_dir, "log.txt")) as f:
        for line in f:
            entry = json.loads(line)
            elapsed += entry["seconds"]
            if "knn_top1" in entry:
                point = {"epoch": entry["epoch"] + 1, "train_seconds": round(elapsed, 1),
                         "knn_top1": round(entry["knn_top1"], 2)}
                if "test_nmi" in entry:
                    point["test_nmi"] = round(entry["test_nmi"], 2)
                curve.append(point)
    record = {"argv": argv, "exp_dir": args.exp_dir, "wall_seconds": round(wall, 1),
              "train_seconds": round(elapsed, 1), "curve": curve}
    return stats, record
