#!/usr/bin/env python
"""Projected wall time of 200-epoch PCL v2 ImageNet pretraining, and of MoCo v2 with the same loader and GPUs, on G
GPUs, part by part, for the official preset, the fast preset as it ships, and explicit variants of the fast path.

Why: whether a full run fits a budget, what PCL costs over MoCo, and which part bounds each, depend on the node and
on the preset's settings; the parts are measured or published one by one, so the projection names the source of
every number it uses, and gives a range (the fastest and the slowest round of the CPU timings) rather than one
number.

The paths (each read from its YAML: loader, precision, k-means backend, E-step features, k-means start, workers):
``official`` = configs/pcl_v2_imagenet.yaml; ``fast`` = configs/pcl_v2_imagenet_fast.yaml as it ships; then the
fast preset with ``--estep-features pass --kmeans-init random``, ``bank --kmeans-init random`` and ``bank
--kmeans-init previous``. The model, per run of E epochs, W of them warm-up, N = 1,281,167 images:

* Loader: the preset's ``workers`` per node (``--workers`` overrides it for every path, a what-if), capped at
  G x (C - ``--main-cores``) cores, each worker one core spending the CPU seconds per item measured here
  (benchmarks/cost_inputs.py: PIL pipeline, --augment device's crop to uint8, or --decode device's bytes + header).
* M-step, every epoch: max(loader, GPU). GPU per pair = the MoCo step at the path's precision (fp32, or bf16 +
  channels-last), / the DDP scaling on G > 1, plus the device input (--augment device's colour ops; --decode device's
  nvJPEG decode, crop and resize of the pair's image), in series. PCL: the step x (1 + the ProtoNCE overhead) after
  warm-up; with ``bank`` one all-gather of the batch's indices per step.
* E-step, E - W times. ``pass``: max(loader over N centre crops, key-encoder forward on G GPUs at the path's
  precision + the device decode of each image with --decode device). ``bank``: no pass (the rows were written by
  the training steps; a pass only at the first E-step when W = 0). k-means at every granularity (2 N k d niter FLOPs
  per run): cold = ``--kmeans-nredo`` runs; warm (``previous``) = one run, except the first E-step and every
  ``--kmeans-warm-check``-th, which also run cold. Official backend: rank 0's GPU, the others wait; torch-ranks: N / G
  rows per GPU plus one all-reduce of the k x (d + 1) sums per iteration.

GPU figures: ``--gpu-json PATH`` takes benchmarks/gpu_check.py's JSON (sections throughput, overhead, kmeans,
kmeans_ranks, estep, device_aug, fast_path: benchmarks/cost_inputs.py reads them) or a flat JSON (per GPU):

    {"gpu": "NVIDIA H100 80GB HBM3",          # the name shown in the source column
     "moco_pairs_per_s_fp32": 700.0,          # MoCo v2 step (ResNet-50, 224 px), pairs/s, fp32
     "moco_pairs_per_s_fast": 1900.0,         # the same step with --amp bf16 --channels-last
     "forward_images_per_s_fp32": 2800.0,     # optional: the E-step's feature pass, fp32 (else 4 x the MoCo step)
     "forward_images_per_s_fast": 7600.0,     # optional: the same under bf16 autocast
     "pcl_overhead_pct": 1.5,                 # optional: PCL step over MoCo step, percent
     "kmeans_tflops": 30.0,                   # optional: effective fp32 TFLOP/s of the official backend's k-means
     "kmeans_tflops_ranks": 30.0,             # optional: the same for torch-ranks, per GPU (else kmeans_tflops)
     "gpu_decode_ms": 0.1,                    # optional: GPU ms per image decoded + resized on the device
     "gpu_augment_ms": 0.02}                  # optional: GPU ms per pair of the device colour ops

Without it the published figures are used, and the table says "published, not measured"; the device input's
figures are then assumed (``--gpu-decode-ms`` / ``--gpu-augment-ms`` set them by hand; the JSON's win otherwise).

    PYTHONPATH=. python benchmarks/cost_model.py                          # 8 GPUs x 14 cores, published GPU figures
    PYTHONPATH=. python benchmarks/cost_model.py --gpu-json $OUT/gpu_check.json --json benchmarks/results/cost.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import hardware, write_json  # noqa: E402
from cost_inputs import (ALLREDUCE_BUS_GBPS, ALLREDUCE_LATENCY_S, JPEG_QUALITY, JPEG_SIZE,  # noqa: E402
                         SCALING_8GPU, CpuCosts, CpuRange, GpuFigures, gpu_from_json, kmeans_flops, measure_cpu,
                         published_gpu)
from cost_tables import parts_table, sensitivity_table, summary_table  # noqa: E402
from pcl.config import build_pretrain_parser  # noqa: E402
from pcl.settings import load_config_defaults, parse_list  # noqa: E402

PRESETS = {"official": os.path.join(ROOT, "configs", "pcl_v2_imagenet.yaml"),
           "fast": os.path.join(ROOT, "configs", "pcl_v2_imagenet_fast.yaml")}
IMAGENET_TRAIN = 1_281_167
OFFICIAL_WORKERS = 32  # -j's official value, for a preset that does not set workers
GOAL_TOTAL_H, GOAL_OVERHEAD_PCT, MOONSHOT_OVERHEAD_PCT = 4.0, 10.0, 5.0  # issue 37's goals for the fast path


@dataclass(frozen=True)
class Path:
    """What one row runs, as its preset (plus overrides) sets it."""
    name: str
    preset: str  # the YAML's file name
    loader: str  # pil | augment (--augment device) | decode (--augment device --decode device)
    amp: str  # none | bf16 | fp16
    backend: str  # --kmeans-backend
    features: str  # --estep-features: pass | bank
    init: str  # --kmeans-init: random | previous
    workers: int  # per node
    warm_check: int
    epochs: int
    warmup: int
    ks: tuple[int, ...]
    dim: int
    niter: int
    nredo: int
    batch: int
    r: int

    @property
    def mode(self) -> str:
        return "fp32" if self.amp == "none" else "amp"


@dataclass(frozen=True)
class Node:
    gpus: int
    cores_per_gpu: int
    main_cores: int
    n: int

    def loader_cores(self, path: Path) -> int:
        return max(min(path.workers, self.gpus * max(self.cores_per_gpu - self.main_cores, 1)), 1)


def read_preset(name: str, file: str, **overrides) -> Path:
    """The path a preset runs: its YAML over pcl/config.py's defaults, then ``overrides`` (Path's field names)."""
    parser = build_pretrain_parser()
    yaml = load_config_defaults(parser, file)
    parser.set_defaults(**yaml)
    get = parser.get_default
    loader = "pil" if get("augment") == "pil" else "decode" if get("decode") == "device" else "augment"
    path = Path(name=name, preset=os.path.basename(file), loader=loader, amp=get("amp"), backend=get("kmeans_backend"),
                features=get("estep_features"), init=get("kmeans_init"),
                workers=int(yaml.get("workers", OFFICIAL_WORKERS)), warm_check=get("kmeans_warm_check"),
                epochs=get("epochs"), warmup=get("warmup_epoch"),
                ks=tuple(parse_list(get("num_cluster"), "num_cluster")),
                dim=get("low_dim"), niter=get("kmeans_niter"), nredo=get("kmeans_nredo"), batch=get("batch_size"),
                r=get("pcl_r"))
    return replace(path, **{k: v for k, v in overrides.items() if v is not None})


def build_paths(workers: int | None = None, epochs: int | None = None, warmup: int | None = None,
                warm_check: int | None = None, presets: dict[str, str] = PRESETS) -> list[Path]:
    """official, fast as shipped, fast + pass + cold, fast + bank + cold, fast + bank + warm (None: the preset's)."""
    common = dict(workers=workers, epochs=epochs, warmup=warmup, warm_check=warm_check)
    return [read_preset("official", presets["official"], **common), read_preset("fast", presets["fast"], **common),
            *(read_preset(name, presets["fast"], features=features, init=init, **common)
              for name, features, init in (("fast + pass + cold", "pass", "random"),
                                           ("fast + bank + cold", "bank", "random"),
                                           ("fast + bank + warm", "bank", "previous")))]


def kmeans_runs(path: Path) -> tuple[int, int]:
    """(cold runs of nredo restarts, warm runs of one) over the run's E-steps at epochs warmup .. epochs - 1: the
    first E-step has no previous centroids; with a warm start every warm_check-th epoch after it also runs cold."""
    esteps = max(path.epochs - path.warmup, 0)
    if esteps == 0 or path.init == "random":
        return esteps, 0
    checks = sum(1 for e in range(path.warmup + 1, path.epochs) if path.warm_check and e % path.warm_check == 0)
    return 1 + checks, esteps - 1


def _collective_s(bus_bytes: float, calls: int = 1) -> float:
    """NCCL collectives moving ``bus_bytes`` per rank in all (a ring all-reduce of S bytes: 2 (G - 1) / G x S; an
    all-gather of S bytes in all: (G - 1) / G x S), ``calls`` latencies."""
    return calls * ALLREDUCE_LATENCY_S + bus_bytes / (ALLREDUCE_BUS_GBPS * 1e9)


def _mstep(cpu: CpuCosts, gpu: GpuFigures, path: Path, node: Node) -> dict[str, float]:
    """Seconds over the run's epochs; PCL's warm-up epochs are MoCo steps (InfoNCE only)."""
    scaling = SCALING_8GPU[path.mode] if node.gpus > 1 else 1.0
    cpu_pair = {"pil": cpu.pil_pair_s, "augment": cpu.augment_pair_s, "decode": cpu.bytes_pair_s}[path.loader]
    device = {"pil": 0.0, "augment": gpu.augment_s, "decode": gpu.augment_s + gpu.decode_s}[path.loader]
    step, per_gpu = 1.0 / (gpu.moco_pairs_per_s[path.mode] * scaling), node.n / node.gpus
    input_s = node.n * cpu_pair / node.loader_cores(path)
    upkeep = 0.0
    if path.features == "bank" and node.gpus > 1:  # the batch's indices all-gathered (8 bytes each) every step
        upkeep = node.n // path.batch * _collective_s((node.gpus - 1) / node.gpus * 8 * path.batch)
    moco = per_gpu * (step + device)
    warm, pcl = moco + upkeep, per_gpu * (step * (1 + gpu.pcl_overhead) + device) + upkeep
    e, w = path.epochs, min(path.warmup, path.epochs)
    return {"mstep_input": e * input_s, "mstep_gpu_device_input": e * per_gpu * device, "mstep_gpu_moco": e * moco,
            "bank_upkeep": e * upkeep, "mstep_gpu_pcl": w * warm + (e - w) * pcl, "mstep_moco": e * max(input_s, moco),
            "mstep_pcl": w * max(input_s, warm) + (e - w) * max(input_s, pcl)}


def _estep(cpu: CpuCosts, gpu: GpuFigures, path: Path, node: Node) -> dict[str, float]:
    """Seconds over the run's E-steps: the feature passes, then the k-means runs."""
    esteps = max(path.epochs - path.warmup, 0)
    scaling = SCALING_8GPU[path.mode] if node.gpus > 1 else 1.0
    cpu_image = {"pil": cpu.pil_eval_s, "augment": cpu.augment_eval_s, "decode": cpu.bytes_image_s}[path.loader]
    device = gpu.decode_s if path.loader == "decode" else 0.0
    pass_cpu = node.n * cpu_image / node.loader_cores(path)
    pass_gpu = node.n / node.gpus * (1.0 / (gpu.forward_images_per_s[path.mode] * scaling) + device)
    passes = esteps if path.features == "pass" else int(esteps > 0 and path.warmup == 0)  # bank: the unwritten rows
    cold, warm = kmeans_runs(path)
    units = cold * path.nredo + warm  # Lloyd runs of niter iterations each
    flops = kmeans_flops(node.n, path.ks, path.dim, path.niter, 1) * units
    if path.backend == "torch-ranks":
        sums = sum(k * (path.dim + 1) * 4 for k in path.ks)  # per iteration: every granularity's sums and counts
        ring = 2 * (node.gpus - 1) / node.gpus
        reduce = _collective_s(ring * sums, calls=len(path.ks)) if node.gpus > 1 else 0.0
        kmeans = flops / (node.gpus * gpu.kmeans_flops_per_s["ranks"]) + reduce * path.niter * units
    else:
        kmeans = flops / gpu.kmeans_flops_per_s["one_gpu"]
    return {"estep_features_input": passes * pass_cpu, "estep_features_gpu": passes * pass_gpu,
            "estep_features": passes * max(pass_cpu, pass_gpu), "estep_kmeans": kmeans}


def project(cpu: CpuCosts, gpu: GpuFigures, path: Path, node: Node) -> dict[str, float]:
    """Hours of every part of ``path`` (percent in the two ``_pct`` rows); see the module docstring."""
    hours = {key: s / 3600 for key, s in {**_mstep(cpu, gpu, path, node), **_estep(cpu, gpu, path, node)}.items()}
    hours["estep"] = hours["estep_features"] + hours["estep_kmeans"]
    hours["pcl_total"] = hours["mstep_pcl"] + hours["estep"]
    hours["moco_total"] = hours["mstep_moco"]
    hours["pcl_over_moco_pct"] = 100 * (hours["pcl_total"] / hours["moco_total"] - 1)
    hours["estep_share_pct"] = 100 * hours["estep"] / hours["pcl_total"]
    return hours


def project_range(cpu: CpuRange, gpu: GpuFigures, paths: list[Path], node: Node) -> dict[str, dict[str, list]]:
    """{path: {row: [low, high]}} from the fastest and the slowest CPU round (a ratio row: the smaller and the
    larger of its two values)."""
    out = {}
    for path in paths:
        a, b = project(cpu.low, gpu, path, node), project(cpu.high, gpu, path, node)
        out[path.name] = {key: [min(a[key], b[key]), max(a[key], b[key])] for key in a}
    return out


def decode_for_goal(cpu: CpuCosts, gpu: GpuFigures, path: Path, node: Node, goal_h: float) -> float | None:
    """The device decode (GPU seconds per image) at which ``path``'s PCL total reaches ``goal_h`` with ``cpu``'s
    costs (the total grows with it; bisection up to 1 ms), None when it is over ``goal_h`` at 0 ms already."""
    def total(decode_s: float) -> float:
        return project(cpu, replace(gpu, decode_s=decode_s), path, node)["pcl_total"]

    low, high = 0.0, 1e-3
    if total(low) > goal_h:
        return None
    if total(high) <= goal_h:
        return high
    for _ in range(40):
        low, high = ((low + high) / 2, high) if total((low + high) / 2) <= goal_h else (low, (low + high) / 2)
    return low


def verdict(rows: dict[str, list], gpu_measured: bool) -> str:
    """Issue 37's goal for the fast path (total <= 4 h, overhead over MoCo v2 <= 10 %, moonshot 5 %) on the range."""
    total, over = rows["pcl_total"], rows["pcl_over_moco_pct"]
    if total[1] <= GOAL_TOTAL_H and over[1] <= GOAL_OVERHEAD_PCT:
        moonshot = over[1] <= MOONSHOT_OVERHEAD_PCT
        text = "meets" + (f" (and the {MOONSHOT_OVERHEAD_PCT:.0f} % moonshot)" if moonshot else "")
    elif total[0] <= GOAL_TOTAL_H and over[0] <= GOAL_OVERHEAD_PCT:
        text = "at the range's low end only"
    else:
        missed = [what for what, bad in ((f"total > {GOAL_TOTAL_H:.0f} h", total[0] > GOAL_TOTAL_H),
                                         (f"overhead > {GOAL_OVERHEAD_PCT:.0f} %", over[0] > GOAL_OVERHEAD_PCT)) if bad]
        text = "misses: " + ", ".join(missed)
    return text + ("" if gpu_measured else " (on published and assumed GPU figures)")


def _parser(epochs: int, warmup: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="G GPUs (default 8)")
    p.add_argument("--cores-per-gpu", type=int, default=14, help="C CPU cores per GPU: caps the workers (default 14)")
    p.add_argument("--main-cores", type=int, default=1, help="cores per GPU kept by the training process (default 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers per node for every path (a what-if; default: each preset's own `workers`)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs (presets: {epochs})")
    p.add_argument("--warmup", type=int, default=None, help=f"epochs without an E-step (presets: {warmup})")
    p.add_argument("--kmeans-warm-check", type=int, default=None, metavar="E",
                   help="with --kmeans-init previous, a cold k-means every E-th E-step too, for every path (a what-if; "
                        "default: the presets', 0: never)")
    p.add_argument("--n", type=int, default=IMAGENET_TRAIN, help="training images (ImageNet-1k: 1,281,167)")
    p.add_argument("--pairs", type=int, default=40, help="synthetic JPEGs timed per pipeline and round (default 40)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds: the fastest and slowest give the range (5)")
    p.add_argument("--gpu-json", default=None, help="gpu_check.py's JSON or a flat JSON (see above)")
    p.add_argument("--published-gpu", choices=("h100", "a100"), default="h100",
                   help="GPU whose published figures stand in for what --gpu-json lacks (default h100)")
    p.add_argument("--kmeans-efficiency", type=float, default=0.5,
                   help="assumed fraction of fp32 peak the k-means reaches, without a measured figure (default 0.5)")
    p.add_argument("--gpu-decode-ms", type=float, default=None,
                   help="GPU ms per image decoded on the device (default: --gpu-json's fast_path, else 0.10, assumed)")
    p.add_argument("--gpu-augment-ms", type=float, default=None,
                   help="GPU ms per pair of the device colour ops (default: --gpu-json's device_aug, else 0.02, "
                        "assumed)")
    p.add_argument("--json", default=None, help="write the inputs and every number here")
    return p


def gpu_figures(opts: argparse.Namespace, path: Path) -> GpuFigures:
    """Published figures, then --gpu-json's, then the device input's figures given on the command line."""
    gpu = published_gpu(opts.published_gpu, path.r, path.dim, len(path.ks), opts.kmeans_efficiency)
    if opts.gpu_json:
        gpu = gpu_from_json(opts.gpu_json, gpu)
    if opts.gpu_decode_ms is not None:
        gpu = replace(gpu, decode_s=opts.gpu_decode_ms / 1e3, decode_source="given (--gpu-decode-ms)")
    if opts.gpu_augment_ms is not None:
        gpu = replace(gpu, augment_s=opts.gpu_augment_ms / 1e3, augment_source="given (--gpu-augment-ms)")
    return gpu


def main(argv: list[str] | None = None) -> dict:
    """Measure the CPU costs here, take the GPU figures, print the inputs and the tables; return (and --json) them."""
    official = read_preset("official", PRESETS["official"])
    opts = _parser(official.epochs, official.warmup).parse_args(argv)
    for flag in ("gpus", "cores_per_gpu", "n", "pairs", "rounds", "epochs", "workers"):
        if getattr(opts, flag) is not None and getattr(opts, flag) < 1:
            raise SystemExit(f"cost_model: --{flag.replace('_', '-')} must be >= 1")
    paths = build_paths(opts.workers, opts.epochs, opts.warmup, opts.kmeans_warm_check)
    if (not all(0 <= p.warmup <= p.epochs and p.warm_check >= 0 for p in paths) or not 0 < opts.kmeans_efficiency <= 1
            or opts.main_cores < 0):
        raise SystemExit("cost_model: need 0 <= --warmup <= --epochs, --kmeans-warm-check >= 0, "
                         "0 < --kmeans-efficiency <= 1, --main-cores >= 0")
    node = Node(opts.gpus, opts.cores_per_gpu, opts.main_cores, opts.n)
    start = time.perf_counter()
    cpu = measure_cpu(opts.pairs, opts.rounds)
    gpu = gpu_figures(opts, official)
    hours = project_range(cpu, gpu, paths, node)
    slower = replace(gpu, decode_s=2 * gpu.decode_s)
    decoding = [p for p in paths if p.loader == "decode"]
    hours_2x = project_range(cpu, slower, decoding, node)
    reach = {p.name: decode_for_goal(cpu.high, gpu, p, node, GOAL_TOTAL_H) for p in decoding}
    measured = all(src.startswith("measured") for src in (gpu.step_source, gpu.forward_source, gpu.overhead_source,
                                                          gpu.decode_source, gpu.augment_source,
                                                          *gpu.kmeans_source.values()))
    verdicts = {p.name: verdict(hours[p.name], measured) for p in paths if p.name != "official"}
    summary = summary_table(paths, hours, node, verdicts)
    parts = parts_table(paths, hours, gpu, node)
    sensitivity = sensitivity_table(hours, hours_2x, gpu, GOAL_TOTAL_H, reach)
    print(f"{hardware()}\nmeasured here ({cpu.pairs} synthetic {JPEG_SIZE[0]}x{JPEG_SIZE[1]} JPEGs of quality "
          f"{JPEG_QUALITY}, 1 thread, {len(cpu.rounds)} rounds: fastest - slowest), CPU ms per core:")
    for name in CpuCosts.__dataclass_fields__:
        print(f"  {name[:-2]:<14} {getattr(cpu.low, name) * 1e3:7.3f} - {getattr(cpu.high, name) * 1e3:7.3f} ms")
    print(f"\n{node.gpus} GPUs x {node.cores_per_gpu} cores, N = {node.n:,}; hours (low - high):\n\n{summary}\n\n"
          f"{parts}\n\n{sensitivity}\n")
    res = {"hardware": hardware(), "argv": list(argv) if argv is not None else sys.argv[1:], "node": asdict(node),
           "paths": {p.name: {**asdict(p), "loader_cores": node.loader_cores(p), "kmeans_runs": list(kmeans_runs(p))}
                     for p in paths},
           "cpu_measured_here": asdict(cpu), "gpu": asdict(gpu), "hours": hours, "hours_decode_2x": hours_2x,
           "verdicts": verdicts, "decode_s_for_goal": reach,
           "tables": {"summary": summary, "parts": parts, "decode_2x": sensitivity},
           "seconds": time.perf_counter() - start}
    print(f"took {res['seconds']:.1f} s")
    if opts.json:
        write_json(res, opts.json)
    return res


if __name__ == "__main__":
    main()
