"""What every benchmark script shares: the hardware line it prints and stores, and writing its JSON."""

import json
import os
import platform

import torch


def hardware(device: torch.device | str = "cpu") -> str:
    """CPU model, cores, torch threads and version, plus the GPU's name when ``device`` is CUDA."""
    device = torch.device(device)
    text = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def write_json(obj, path: str) -> None:
    """Write ``obj`` to ``path`` (folders created), and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"\nwrote {path}")
