"""What every benchmark script shares: the hardware line it prints and stores, and writing its JSON.

The study drivers in ``experiments/`` use the same three (through ``experiments/study.py``), so a speed number and a
study result name their hardware alike."""

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
