"""The markdown tables of benchmarks/cost_model.py: the summary per path, the parts per path with numbered sources,
and the totals with the device decode at twice its figure. Every cell is a range, the fastest to the slowest CPU
round (one number when both agree to the digits shown)."""

from __future__ import annotations

from typing import Any

from cost_inputs import ALLREDUCE_BUS_GBPS, ALLREDUCE_LATENCY_S, DLE, GpuFigures

HERE = "measured here (CPU seconds per item on one core of this machine, the fastest - the slowest round)"
SCALING = "published, not measured (DDP scaling on 8 A100s: 7.72x TF32, 6.72x AMP, " + DLE + "; used for any G > 1)"
ALLREDUCE = (f"assumed (NCCL: {ALLREDUCE_BUS_GBPS:.0f} GB/s bus bandwidth, {ALLREDUCE_LATENCY_S * 1e6:.0f} us per "
             f"call; H100 NVLink 4: 450 GB/s per direction, datasheet)")
LOADERS = {"pil": "PIL loader", "augment": "--augment device", "decode": "--augment device --decode device"}


def cell(values: list[float], unit: str) -> str:
    """'low-high unit', or one number when both round alike (1 decimal for percent, 2 for hours)."""
    digits = 1 if unit == "%" else 2
    low, high = (f"{v:.{digits}f}" for v in values)
    return f"{low} {unit}" if low == high else f"{low}-{high} {unit}"


def describe(path: Any) -> str:
    """What a path runs, in flags."""
    backend = ("torch-ranks on all GPUs" if path.backend == "torch-ranks" else
               "faiss (auto) on rank 0" if path.backend == "auto" else f"{path.backend} on rank 0")
    start = (f"cold (nredo {path.nredo})" if path.init == "random" else
             f"warm (nredo 1; cold at the first E-step and every {path.warm_check}th)" if path.warm_check else
             "warm (nredo 1; cold at the first E-step)")
    precision = "fp32" if path.amp == "none" else path.amp
    return f"{LOADERS[path.loader]}, {precision}, k-means {backend}, E-step {path.features}, {start}"


def summary_table(paths: list, hours: dict, node: Any, verdicts: dict[str, str]) -> str:
    """One row per path: what it runs, its loader cores, PCL and MoCo totals, overhead, E-step share, the goal."""
    lines = ["| path | runs | loader cores | PCL v2 | MoCo v2 | PCL over MoCo | E-step share "
             "| goal (<= 4 h, <= 10 %) |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        rows = hours[path.name]
        lines.append(f"| {path.name} ({path.preset}) | {describe(path)} | {node.loader_cores(path)} of "
                     f"{path.workers} workers | {cell(rows['pcl_total'], 'h')} | {cell(rows['moco_total'], 'h')} | "
                     f"{cell(rows['pcl_over_moco_pct'], '%')} | {cell(rows['estep_share_pct'], '%')} | "
                     f"{verdicts.get(path.name, 'n/a (official)')} |")
    return "\n".join(lines)


def _parts(gpu: GpuFigures) -> list[tuple[str, str, list[str]]]:
    return [
        ("mstep_input", "M-step input: CPU loader workers", [HERE]),
        ("mstep_gpu_device_input", "M-step GPU: device decode + colour ops", [gpu.decode_source, gpu.augment_source]),
        ("mstep_gpu_moco", "M-step GPU, MoCo v2 (steps + device input)", [gpu.step_source, SCALING]),
        ("mstep_gpu_pcl", "M-step GPU, PCL (+ ProtoNCE after warm-up, + bank upkeep)",
         [gpu.step_source, SCALING, gpu.overhead_source]),
        ("bank_upkeep", "of which the bank's index all-gather", [ALLREDUCE]),
        ("mstep_moco", "M-step wall, MoCo v2 = max(input, GPU)", []),
        ("mstep_pcl", "M-step wall, PCL = max(input, GPU)", []),
        ("estep_features_input", "E-step features: CPU loader workers", [HERE]),
        ("estep_features_gpu", "E-step features: GPU forward + device decode",
         [gpu.forward_source, SCALING, gpu.decode_source]),
        ("estep_features", "E-step features wall = max(CPU, GPU)", []),
        ("estep_kmeans", "E-step k-means (rank 0, or torch-ranks on all GPUs)",
         [gpu.kmeans_source["one_gpu"], gpu.kmeans_source["ranks"], ALLREDUCE]),
        ("estep", "E-step total", []),
        ("pcl_total", "**PCL v2**", []),
        ("moco_total", "**MoCo v2** (no E-step, no ProtoNCE)", []),
        ("pcl_over_moco_pct", "PCL overhead over MoCo v2", []),
        ("estep_share_pct", "E-step share of PCL", []),
    ]


def parts_table(paths: list, hours: dict, gpu: GpuFigures, node: Any) -> str:
    """Part x path, hours (percent in the last two rows), with the source of each row: its kind ("measured here",
    "measured on GPU", "published, not measured", "derived", "estimated", "assumed, not measured") and a numbered
    note under the table saying exactly what it is."""
    notes: list[str] = []
    lines = ["| part | " + " | ".join(p.name for p in paths) + " | source |",
             "|---|" + "---|" * len(paths) + "---|"]
    for key, label, sources in _parts(gpu):
        refs = []
        for source in dict.fromkeys(sources):
            if source not in notes:
                notes.append(source)
            refs.append(f"{source.split(' (')[0].split(':')[0]} [{notes.index(source) + 1}]")
        unit = "%" if key.endswith("_pct") else "h"
        cells = " | ".join(cell(hours[p.name][key], unit) for p in paths)
        lines.append(f"| {label} | {cells} | {'; '.join(refs) or 'sum / max / ratio of the rows above'} |")
    lines.append("")
    lines += [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def sensitivity_table(hours: dict, hours_2x: dict, gpu: GpuFigures, goal_h: float, reach: dict) -> str:
    """The --decode device paths with the device decode at the figure used and at twice it, and ``reach``: the
    decode figure (seconds per image, None: none) at which PCL v2's total reaches ``goal_h`` (the slowest round)."""
    ms = gpu.decode_s * 1e3
    lines = [f"| path | PCL v2, decode {ms:.3g} ms | PCL v2, decode {2 * ms:.3g} ms | MoCo v2, {ms:.3g} ms | "
             f"MoCo v2, {2 * ms:.3g} ms | PCL over MoCo, {ms:.3g} ms | PCL over MoCo, {2 * ms:.3g} ms | "
             f"PCL v2 <= {goal_h:g} h up to |", "|---|---|---|---|---|---|---|---|"]
    for name, slow in hours_2x.items():
        base, at = hours[name], reach[name]
        lines.append(f"| {name} | {cell(base['pcl_total'], 'h')} | {cell(slow['pcl_total'], 'h')} | "
                     f"{cell(base['moco_total'], 'h')} | {cell(slow['moco_total'], 'h')} | "
                     f"{cell(base['pcl_over_moco_pct'], '%')} | {cell(slow['pcl_over_moco_pct'], '%')} | "
                     f"{'none (over it at 0 ms)' if at is None else f'{at * 1e3:.3f} ms'} |")
    return "\n".join(lines)
