"""What every benchmark script shares: the hardware line it prints and stores, and writing its JSON."""

import json
import os
import platform

import torch


def use_cores() -> int:
    """Torch threads = $OMP_NUM_THREADS when set (one per run when runs share the cores), else every core."""
    n = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def hardware(device: torch.device | str = "cpu") -> str:
    """CPU model, cores, torch threads and version, plus the GPU's name when ``device`` is CUDA."""
    device = torch.device(device)
    text = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def write_json(obj, path: str):
    """Write ``obj`` to ``path`` (folders created), say where, and return ``obj`` (a script's result)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"\nwrote {path}")
    return obj


def fit_with_curve(argv: list[str]) -> tuple[dict, dict]:
    """Pretrain with ``main_pcl`` flags in this process; returns (fit's stats, a record of the run): wall and
    training seconds (E-steps in, kNN monitoring out) and the learning curve read back from EXP_DIR/log.txt."""
    import time

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
