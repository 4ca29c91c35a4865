#!/usr/bin/env python
"""Projected wall time of 200-epoch PCL v2 ImageNet pretraining (and of MoCo v2 in the same model) on G GPUs with
C CPU cores per GPU, part by part, the official path against the fast path.

Why: whether a full run fits a budget, and which part bounds it, depends on the cluster (GPUs, cores per GPU);
the parts are measured or published one by one, so the projection names the source of every number it uses.

The model (per run of ``--epochs`` E epochs, ``--warmup`` W of them without an E-step, N = 1,281,167 images):

* M-step, every epoch: time = max(input pipeline, GPU steps) over N pairs.
  Input: G x (C - ``--main-cores``) loader cores, each spending the CPU seconds per pair *measured here*: the
  official PIL MoCo v2 pipeline (``pcl.data.transforms.pretrain_transform(aug_plus=True)``) twice per decoded
  JPEG; the fast path's workers only decode, RandomResizedCrop and flip to uint8 (torchvision's
  ``RandomResizedCrop``, ``RandomHorizontalFlip``, ``PILToTensor``), twice; its colour ops run batched on the GPU
  and are not timed here (gpu_check does not time them either). GPU: G x MoCo pairs/s per GPU x the DDP scaling
  efficiency; official path fp32 (TF32 convolutions, torch's default), fast path bf16 + channels-last. A PCL
  step is the MoCo step plus the ProtoNCE terms (overhead from the GPU JSON, else a FLOP-count estimate).
* E-step, E - W times: features of N images through the eval transform (Resize 256, CenterCrop 224; CPU cost per
  image measured here, fast path: uint8 out, normalised on the GPU) vs the key encoder's forward on G GPUs
  (forward = 1/4 of a MoCo step: query fwd + bwd ~ 3 forwards, key fwd 1), time = max of the two; then k-means
  at every granularity (k = 25k/50k/100k, d = 128, niter and nredo of configs/pcl_v2_imagenet.yaml and
  pcl/config.py): FLOPs = 2 N k d niter nredo each. Official: on one GPU (rank 0), the others wait. Fast path:
  each of G ranks assigns N / G rows, plus one all-reduce of the k x (d + 1) sums and counts per iteration.

GPU figures: ``--gpu-json PATH`` takes either the JSON of benchmarks/gpu_check.py (its ``sections.throughput``:
``images_per_s`` ``fp32`` and ``fast_variant``, each the batch size over a MoCo step's seconds, i.e. pairs/s;
``sections.overhead.overhead_pct``; ``sections.kmeans``: ``n``, ``seconds_nredo<R>`` per k, turned into an
effective FLOP/s) or a flat JSON with these keys (documented here, all per GPU):

    {"gpu": "NVIDIA H100 80GB HBM3",          # the name shown in the source column
     "moco_pairs_per_s_fp32": 700.0,          # MoCo v2 step (ResNet-50, 224 px), pairs/s, fp32: official path
     "moco_pairs_per_s_fast": 1900.0,         # the same step with --amp bf16 --channels-last: fast path
     "pcl_overhead_pct": 1.5,                 # optional: PCL step over MoCo step, percent
     "kmeans_tflops": 30.0}                   # optional: effective fp32 TFLOP/s of the E-step's k-means

Without it the published figures are used, and the table says "published, not measured".

    PYTHONPATH=. python benchmarks/cost_model.py                          # 8 GPUs x 14 cores, published GPU figures
    PYTHONPATH=. python benchmarks/cost_model.py --gpu-json $OUT/gpu_check.json --json benchmarks/results/cost.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import hardware, write_json  # noqa: E402
from pcl.config import build_pretrain_parser  # noqa: E402
from pcl.data.transforms import MEAN, STD, pretrain_transform  # noqa: E402
from pcl.settings import load_config_defaults, parse_list  # noqa: E402

PRESET = os.path.join(ROOT, "configs", "pcl_v2_imagenet.yaml")
IMAGENET_TRAIN = 1_281_167
JPEG_SIZE, JPEG_QUALITY = (500, 375), 90  # a typical ImageNet photo, as gpu_check's pil section

# Published figures (not measured by this script); each names its source.
DLE = "NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, DGX A100 80GB, pytorch-21.03 NGC"
A100_TRAIN_IMG_S = {"official": 938.0, "fast": 2470.0}  # ResNet-50 training images/s on one A100 (DLE)
SCALING_8GPU = {"official": 7.72 / 8, "fast": 6.72 / 8}  # DDP efficiency on 8 GPUs (DLE), used for any G > 1
H100_OVER_A100 = 1.8  # assumed ratio (issue 26's figure), applied to the A100 numbers for --published-gpu h100
FP32_PEAK_TFLOPS = {"a100": 19.5, "h100": 67.0}  # NVIDIA datasheets: A100 SXM, H100 SXM non-tensor FP32
MOCO_OVER_TRAIN = 4 / 3  # MoCo step = query fwd + bwd (~3 forwards) + key fwd (1) vs a training step's 3 forwards
FORWARD_OVER_MOCO = 4.0  # forward-only images/s = 4 x MoCo pairs/s (DLE's V100 inference/training ratio is 2.8-3.4x
# for training steps of 3 forwards: consistent)
RESNET50_GMACS = 4.09  # torchvision's ResNet50_Weights.IMAGENET1K_V1 "GFLOPS" (multiply-adds) at 224 px
ALLREDUCE_BUS_GBPS = 300.0  # assumed NCCL all-reduce bus bandwidth within an NVLink node (H100 NVLink 4: 450 GB/s
# per direction, datasheet); below it on purpose
ALLREDUCE_LATENCY_S = 50e-6  # assumed NCCL latency per all-reduce call


@dataclass
class CpuCosts:
    """CPU seconds per pair (pretraining) or per image (eval) on one core of this machine, one thread each."""
    official_pair_s: float  # decode + pretrain_transform(aug_plus=True) twice
    fast_pair_s: float  # decode + RandomResizedCrop + flip + PILToTensor twice
    official_eval_s: float  # decode + Resize 256 + CenterCrop 224 + ToTensor + Normalize
    fast_eval_s: float  # decode + Resize 256 + CenterCrop 224 + PILToTensor
    decode_s: float  # the JPEG decode alone (part of every figure above)
    pairs: int
    rounds: int


@dataclass
class GpuFigures:
    """Per-GPU throughputs of the two paths and where each comes from."""
    moco_pairs_per_s: dict[str, float]  # {"official": fp32, "fast": bf16 + channels-last}
    step_source: str
    pcl_overhead: float  # fraction: PCL step time / MoCo step time - 1
    overhead_source: str
    kmeans_flops_per_s: float  # effective fp32 FLOP/s of the k-means on one GPU
    kmeans_source: str


def _write_jpeg(rng: np.random.Generator, path: str) -> None:
    """A 500 x 375 JPEG of quality 90 with smooth (photo-like, not noise) content: photo-like sizes and decode times."""
    w, h = JPEG_SIZE
    smooth = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((w, h), Image.BILINEAR).save(path, quality=JPEG_QUALITY)


def _timed(fn: Callable[..., object], *args: object) -> tuple[float, object]:
    """(seconds, result) of ``fn(*args)``."""
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _decode(path: str) -> Image.Image:
    """Read and decode a JPEG as a loader worker does (torchvision's pil_loader)."""
    with open(path, "rb") as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def _twice(transform: Callable, img: Image.Image) -> tuple:
    """Both crops of a pair from one decoded image, as TwoCropsTransform."""
    return transform(img), transform(img)


def measure_cpu(pairs: int, rounds: int, seed: int = 0) -> CpuCosts:
    """Time each pipeline on ``pairs`` synthesised JPEGs on one thread, ``rounds`` times; the fastest round counts
    (the least disturbed by other work on shared cores). Each image is decoded once per round, as a loader worker
    does (one decode, two crops); the eval paths share the resize + crop and differ in the tensor conversion only,
    so the fast path's figure is the official one's minus work it does not do."""
    official = pretrain_transform(aug_plus=True, size=224, min_scale=0.2)
    fast = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])
    eval_crop = T.Compose([T.Resize(256), T.CenterCrop(224)])
    eval_official = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    eval_fast = T.PILToTensor()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    totals: dict[str, list[float]] = {key: [] for key in ("decode", "official", "fast", "crop", "eval_o", "eval_f")}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(seed)
            paths = [os.path.join(tmp, f"{i}.jpg") for i in range(pairs)]
            for path in paths:
                _write_jpeg(rng, path)
            for r in range(rounds + 1):  # round 0 warms up (imports, allocator, page cache) and is dropped
                acc = dict.fromkeys(totals, 0.0)
                for path in paths:
                    t, img = _timed(_decode, path)
                    acc["decode"] += t
                    acc["official"] += _timed(_twice, official, img)[0]
                    acc["fast"] += _timed(_twice, fast, img)[0]
                    t, cropped = _timed(eval_crop, img)
                    acc["crop"] += t
                    acc["eval_o"] += _timed(eval_official, cropped)[0]
                    acc["eval_f"] += _timed(eval_fast, cropped)[0]
                if r:
                    for key, value in acc.items():
                        totals[key].append(value / pairs)
    finally:
        torch.set_num_threads(threads)
    best = {key: min(values) for key, values in totals.items()}
    return CpuCosts(official_pair_s=best["decode"] + best["official"], fast_pair_s=best["decode"] + best["fast"],
                    official_eval_s=best["decode"] + best["crop"] + best["eval_o"],
                    fast_eval_s=best["decode"] + best["crop"] + best["eval_f"], decode_s=best["decode"],
                    pairs=pairs, rounds=rounds)


def kmeans_flops(n: int, ks: list[int], dim: int, niter: int, nredo: int) -> float:
    """FLOPs of Lloyd's assignment (the N x k distance products) over every granularity: 2 N k d niter nredo each."""
    return float(sum(2.0 * n * k * dim * niter * nredo for k in ks))


def pcl_overhead_estimate(r: int, dim: int, granularities: int) -> float:
    """ProtoNCE's extra FLOPs per pair over a MoCo v2 step's (a lower bound: sampling and gathers are not FLOPs):
    per granularity 1 + r prototype logits of d products each, forward and backward (x3), vs 4 ResNet-50 forwards."""
    extra = granularities * 3 * 2.0 * (r + 1) * dim
    return extra / (FORWARD_OVER_MOCO * 2.0 * RESNET50_GMACS * 1e9)


def published_gpu(gpu: str, r: int, dim: int, granularities: int, efficiency: float) -> GpuFigures:
    """The GPU figures from published numbers (see the constants' sources), for an A100 or an H100."""
    ratio = H100_OVER_A100 if gpu == "h100" else 1.0
    pairs = {path: ips * ratio / MOCO_OVER_TRAIN for path, ips in A100_TRAIN_IMG_S.items()}
    how = f" x {H100_OVER_A100} (assumed H100/A100)" if gpu == "h100" else ""
    return GpuFigures(
        moco_pairs_per_s=pairs,
        step_source=f"published, not measured ({gpu.upper()}: A100 ResNet-50 training, 1 GPU, 938 img/s TF32 and "
                    f"2470 img/s AMP ({DLE}){how}, / {MOCO_OVER_TRAIN:.2f} for a MoCo step)",
        pcl_overhead=pcl_overhead_estimate(r, dim, granularities),
        overhead_source="estimated (ProtoNCE FLOPs over ResNet-50's 4.09 GMACs, torchvision docs)",
        kmeans_flops_per_s=FP32_PEAK_TFLOPS[gpu] * 1e12 * efficiency,
        kmeans_source=f"published, not measured ({gpu.upper()} fp32 peak {FP32_PEAK_TFLOPS[gpu]:.1f} TFLOP/s, "
                      f"NVIDIA datasheet, x {efficiency:.0%} assumed efficiency)")


def gpu_from_json(path: str, fallback: GpuFigures) -> GpuFigures:
    """GPU figures from gpu_check.py's JSON or a flat JSON (keys in the module docstring); a figure the file
    lacks (no overhead, no k-means) keeps ``fallback``'s value and source."""
    with open(path) as f:
        data = json.load(f)
    if "sections" in data:  # gpu_check.py's output
        sec = data["sections"]
        name = data.get("hardware", "?").split(", ")[-1] if data.get("device", "cuda") != "cpu" else "the CPU"
        thr = sec.get("throughput", {})
        ips = thr.get("images_per_s") or {}
        if "fp32" not in ips or thr.get("fast_variant") not in ips:
            raise SystemExit(f"cost_model: {path} has no throughput section with fp32 and its fast variant")
        sizes = data.get("sizes", {})
        if sizes.get("arch") != "resnet50" or sizes.get("image_size") != 224:
            print(f"warning: {path} timed {sizes.get('arch')} at {sizes.get('image_size')} px, not ResNet-50 at "
                  f"224 px (gpu_check --smoke?): the projection uses it as it is")
        flat = {"gpu": name, "moco_pairs_per_s_fp32": ips["fp32"], "moco_pairs_per_s_fast": ips[thr["fast_variant"]]}
        if "overhead_pct" in sec.get("overhead", {}):
            flat["pcl_overhead_pct"] = sec["overhead"]["overhead_pct"]
        km = sec.get("kmeans", {})
        runs = sorted(int(key[len("seconds_nredo"):]) for key in km if key.startswith("seconds_nredo"))
        if runs:
            per_k = km[f"seconds_nredo{runs[-1]}"]
            flops = kmeans_flops(km["n"], [int(k) for k in per_k], 128, 20, runs[-1])
            flat["kmeans_tflops"] = flops / sum(per_k.values()) / 1e12
    else:
        flat = data
    missing = [k for k in ("moco_pairs_per_s_fp32", "moco_pairs_per_s_fast") if k not in flat]
    if missing:
        raise SystemExit(f"cost_model: {path} lacks {missing} (see the keys in benchmarks/cost_model.py's docstring)")
    where = f"measured on GPU ({flat.get('gpu', 'unnamed')}, {os.path.basename(path)})"
    out = GpuFigures(**asdict(fallback))
    out.moco_pairs_per_s = {"official": float(flat["moco_pairs_per_s_fp32"]),
                            "fast": float(flat["moco_pairs_per_s_fast"])}
    out.step_source = where
    if "pcl_overhead_pct" in flat:
        out.pcl_overhead, out.overhead_source = max(float(flat["pcl_overhead_pct"]), 0.0) / 100.0, where
    if "kmeans_tflops" in flat:
        out.kmeans_flops_per_s, out.kmeans_source = float(flat["kmeans_tflops"]) * 1e12, where
    return out


def preset() -> dict:
    """The ImageNet preset's values with pcl/config.py's defaults under it (k-means niter/nredo are not in the YAML)."""
    parser = build_pretrain_parser()
    parser.set_defaults(**load_config_defaults(parser, PRESET))
    return {key: parser.get_default(key) for key in ("epochs", "warmup_epoch", "num_cluster", "low_dim", "pcl_r",
                                                       "kmeans_niter", "kmeans_nredo")}


def project(cpu: CpuCosts, gpu: GpuFigures, gpus: int, cores_per_gpu: int, main_cores: int, epochs: int,
            warmup: int, n: int, ks: list[int], dim: int, niter: int, nredo: int) -> dict:
    """Hours of every part for 200 (``epochs``) epochs, official and fast path; see the module docstring."""
    loader_cores = gpus * max(cores_per_gpu - main_cores, 1)
    esteps = max(epochs - warmup, 0)
    scaling = {p: SCALING_8GPU[p] if gpus > 1 else 1.0 for p in ("official", "fast")}
    cpu_pair = {"official": cpu.official_pair_s, "fast": cpu.fast_pair_s}
    cpu_eval = {"official": cpu.official_eval_s, "fast": cpu.fast_eval_s}
    flops = kmeans_flops(n, ks, dim, niter, nredo)
    allreduce = 2 * (gpus - 1) / gpus * sum(k * (dim + 1) * 4 for k in ks) / (ALLREDUCE_BUS_GBPS * 1e9)
    allreduce = (allreduce + len(ks) * ALLREDUCE_LATENCY_S) * niter * nredo if gpus > 1 else 0.0

    def hours(seconds_per_epoch: float, times: int) -> float:
        return seconds_per_epoch * times / 3600

    rows: dict[str, dict[str, float]] = {}
    for p in ("official", "fast"):
        moco_rate = gpus * gpu.moco_pairs_per_s[p] * scaling[p]  # pairs/s over all GPUs
        fwd_rate = gpus * gpu.moco_pairs_per_s[p] * FORWARD_OVER_MOCO * scaling[p]
        input_s = n * cpu_pair[p] / loader_cores
        moco_s, pcl_s = n / moco_rate, n / moco_rate * (1 + gpu.pcl_overhead)
        feat_cpu_s, feat_gpu_s = n * cpu_eval[p] / loader_cores, n / fwd_rate
        km_s = (flops / gpu.kmeans_flops_per_s if p == "official"
                else flops / (gpus * gpu.kmeans_flops_per_s) + allreduce)
        part = {
            "mstep_input": hours(input_s, epochs),
            "mstep_gpu_moco": hours(moco_s, epochs),
            "mstep_gpu_pcl": hours(pcl_s, epochs),
            "mstep_moco": hours(max(input_s, moco_s), epochs),
            "mstep_pcl": hours(max(input_s, pcl_s), epochs),
            "estep_features_input": hours(feat_cpu_s, esteps),
            "estep_features_gpu": hours(feat_gpu_s, esteps),
            "estep_features": hours(max(feat_cpu_s, feat_gpu_s), esteps),
            "estep_kmeans": hours(km_s, esteps),
        }
        part["estep"] = part["estep_features"] + part["estep_kmeans"]
        part["pcl_total"] = part["mstep_pcl"] + part["estep"]
        part["moco_total"] = part["mstep_moco"]
        part["pcl_over_moco_pct"] = 100 * (part["pcl_total"] / part["moco_total"] - 1)
        part["estep_share_pct"] = 100 * part["estep"] / part["pcl_total"]
        for key, value in part.items():
            rows.setdefault(key, {})[p] = value
    return {"rows": rows, "loader_cores": loader_cores, "esteps": esteps, "kmeans_flops_per_estep": flops,
            "allreduce_seconds_per_estep_fast": allreduce, "scaling": scaling}


def table(proj: dict, gpu: GpuFigures, ks: list[int], nredo: int, epochs: int) -> str:
    """The markdown table: part | official | fast | source, hours for ``epochs`` epochs (percent in the last two).
    The source column gives each source's kind ("measured here", "measured on GPU", "published, not measured",
    "estimated", "assumed") with a numbered note under the table saying exactly what it is."""
    here = "measured here (CPU seconds per pair or image per core, this machine, see above)"
    fwd = "derived (forward = MoCo step / 4: query fwd + bwd ~ 3 forwards + key fwd)"
    allreduce = (f"assumed (fast path's all-reduce: {ALLREDUCE_BUS_GBPS:.0f} GB/s NCCL bus bandwidth, "
                 f"{ALLREDUCE_LATENCY_S * 1e6:.0f} us per call; H100 NVLink 4: 450 GB/s per direction, datasheet)")
    scaling = f"published, not measured (DDP scaling on 8 A100s: 7.72x TF32, 6.72x AMP, {DLE}; used for any G > 1)"
    ktext = "/".join(f"{k // 1000}k" for k in ks)
    parts = [
        ("mstep_input", "M-step input pipeline (CPU loader)", [here]),
        ("mstep_gpu_moco", "M-step GPU steps, MoCo v2", [gpu.step_source, scaling]),
        ("mstep_gpu_pcl", "M-step GPU steps, PCL (+ ProtoNCE)", [gpu.step_source, scaling, gpu.overhead_source]),
        ("mstep_pcl", "M-step wall, PCL = max(input, GPU)", [here, gpu.step_source]),
        ("estep_features_input", "E-step features, CPU eval loader", [here]),
        ("estep_features_gpu", "E-step features, GPU forward", [gpu.step_source, scaling, fwd]),
        ("estep_features", "E-step features wall = max(CPU, GPU)", [here, gpu.step_source]),
        ("estep_kmeans", f"E-step k-means ({ktext}, nredo {nredo}; official: 1 GPU, fast: all GPUs)",
         [gpu.kmeans_source, allreduce]),
        ("estep", "E-step total (features + k-means)", []),
        ("pcl_total", f"**PCL v2, {epochs} epochs**", []),
        ("moco_total", f"**MoCo v2, {epochs} epochs** (M-step wall)", [here, gpu.step_source]),
        ("pcl_over_moco_pct", "PCL overhead over MoCo v2", []),
        ("estep_share_pct", "E-step share of PCL", []),
    ]
    notes: list[str] = []
    lines = ["| part | official path | fast path | source |", "|---|---|---|---|"]
    for key, label, sources in parts:
        refs = []
        for source in dict.fromkeys(sources):
            if source not in notes:
                notes.append(source)
            refs.append(f"{source.split(' (')[0]} [{notes.index(source) + 1}]")
        row = proj["rows"][key]
        unit = " %" if key.endswith("_pct") else " h"
        lines.append(f"| {label} | {row['official']:.2f}{unit} | {row['fast']:.2f}{unit} | "
                     f"{'; '.join(refs) or 'sum / ratio of the rows above'} |")
    lines.append("")
    lines += [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Measure the CPU costs here, take the GPU figures, print the inputs and the table; return (and --json) them."""
    pre = preset()
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="G GPUs (default 8)")
    p.add_argument("--cores-per-gpu", type=int, default=14, help="C CPU cores per GPU (default 14)")
    p.add_argument("--main-cores", type=int, default=1,
                   help="cores per GPU kept by the training process, not loading (default 1)")
    p.add_argument("--epochs", type=int, default=pre["epochs"], help=f"epochs (preset: {pre['epochs']})")
    p.add_argument("--warmup", type=int, default=pre["warmup_epoch"],
                   help=f"epochs without an E-step (preset: {pre['warmup_epoch']})")
    p.add_argument("--n", type=int, default=IMAGENET_TRAIN, help="training images (ImageNet-1k: 1,281,167)")
    p.add_argument("--pairs", type=int, default=40, help="synthetic JPEGs timed per pipeline and round (default 40)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, the fastest kept (default 3)")
    p.add_argument("--gpu-json", default=None, help="gpu_check.py's JSON or a flat JSON (see above)")
    p.add_argument("--published-gpu", choices=("h100", "a100"), default="h100",
                   help="GPU whose published figures stand in for what --gpu-json lacks (default h100)")
    p.add_argument("--kmeans-efficiency", type=float, default=0.5,
                   help="assumed fraction of fp32 peak the k-means reaches, without a measured figure (default 0.5)")
    p.add_argument("--json", default=None, help="write the inputs and every number here")
    opts = p.parse_args(argv)
    for flag in ("gpus", "cores_per_gpu", "epochs", "n", "pairs", "rounds"):
        if getattr(opts, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 <= opts.warmup <= opts.epochs or not 0 < opts.kmeans_efficiency <= 1 or opts.main_cores < 0:
        p.error("need 0 <= --warmup <= --epochs, 0 < --kmeans-efficiency <= 1, --main-cores >= 0")
    ks = parse_list(pre["num_cluster"], "num_cluster")
    dim, niter, nredo = pre["low_dim"], pre["kmeans_niter"], pre["kmeans_nredo"]

    start = time.perf_counter()
    cpu = measure_cpu(opts.pairs, opts.rounds)
    gpu = published_gpu(opts.published_gpu, pre["pcl_r"], dim, len(ks), opts.kmeans_efficiency)
    if opts.gpu_json:
        gpu = gpu_from_json(opts.gpu_json, gpu)
    proj = project(cpu, gpu, opts.gpus, opts.cores_per_gpu, opts.main_cores, opts.epochs, opts.warmup, opts.n, ks,
                   dim, niter, nredo)
    text = table(proj, gpu, ks, nredo, opts.epochs)
    print(f"{hardware()}\nmeasured here ({cpu.pairs} synthetic {JPEG_SIZE[0]}x{JPEG_SIZE[1]} JPEGs of quality "
          f"{JPEG_QUALITY}, 1 thread, fastest of {cpu.rounds} rounds), CPU seconds per core:")
    print(f"  decode only                                   {cpu.decode_s * 1e3:7.2f} ms per image")
    print(f"  official pair (PIL MoCo v2 aug x2)            {cpu.official_pair_s * 1e3:7.2f} ms per pair")
    print(f"  fast pair (crop + flip -> uint8 x2)           {cpu.fast_pair_s * 1e3:7.2f} ms per pair")
    print(f"  official eval (Resize 256, CenterCrop 224)    {cpu.official_eval_s * 1e3:7.2f} ms per image")
    print(f"  fast eval (same, uint8 out)                   {cpu.fast_eval_s * 1e3:7.2f} ms per image")
    print(f"GPU per GPU: MoCo step {gpu.moco_pairs_per_s['official']:.0f} pairs/s official, "
          f"{gpu.moco_pairs_per_s['fast']:.0f} fast ({gpu.step_source}); PCL step overhead "
          f"{gpu.pcl_overhead:.2%} ({gpu.overhead_source}); k-means {gpu.kmeans_flops_per_s / 1e12:.1f} TFLOP/s "
          f"({gpu.kmeans_source})")
    print(f"\n{opts.gpus} GPUs x {opts.cores_per_gpu} cores ({proj['loader_cores']} loader cores), {opts.epochs} "
          f"epochs, {proj['esteps']} E-steps, N = {opts.n:,}, k = {ks}, d = {dim}, niter {niter}, nredo {nredo}; "
          f"DDP scaling {proj['scaling']['official']:.2f} / {proj['scaling']['fast']:.2f} (official / fast, "
          f"{'published 8-GPU figures' if opts.gpus > 1 else 'one GPU'}); hours:\n\n{text}\n")
    res = {"hardware": hardware(), "argv": list(argv) if argv is not None else sys.argv[1:],
           "inputs": {"gpus": opts.gpus, "cores_per_gpu": opts.cores_per_gpu, "main_cores": opts.main_cores,
                      "epochs": opts.epochs, "warmup": opts.warmup, "n": opts.n, "ks": ks, "dim": dim,
                      "niter": niter, "nredo": nredo},
           "cpu_measured_here": asdict(cpu), "gpu": asdict(gpu), "hours": proj["rows"],
           "model": {k: v for k, v in proj.items() if k != "rows"}, "table": text,
           "seconds": time.perf_counter() - start}
    print(f"took {res['seconds']:.1f} s")
    if opts.json:
        write_json(res, opts.json)
    return res


if __name__ == "__main__":
    main()
