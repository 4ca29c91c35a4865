"""The inputs of benchmarks/cost_model.py: the CPU seconds of every loader pipeline, measured on this machine over
several rounds (the fastest and the slowest round give a range), and the per-GPU figures, from the GPU check's JSON
(benchmarks/gpu_check.py) when given, else published, estimated or assumed numbers, each naming its source.

What the loader workers do per item, as timed here (one thread, synthetic photo-like JPEGs from the page cache):

* ``pil_pair``: read + PIL decode + the official MoCo v2 pipeline twice (``--augment pil``);
* ``augment_pair``: read + decode + the official RandomResizedCrop + flip to uint8, twice (``--augment device``
  with ``--decode cpu``; the colour ops run on the GPU);
* ``bytes_pair``: ``pcl.data.device_input.EncodedPairs``: read the bytes, parse the JPEG header with PIL (no
  decode), draw the two crop boxes (``PretrainCropBoxes``) (``--decode device``: the GPU decodes);
* ``pil_eval``: read + decode + Resize 256 + CenterCrop 224 + ToTensor + Normalize (the E-step's pass, PIL path);
* ``augment_eval``: the same to uint8 (``--augment device``, ``--decode cpu``);
* ``bytes_image``: ``EncodedImages``: read the bytes and the header (``--decode device``'s E-step pass);
* ``decode``: read + decode alone (part of every decoding figure above).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from PIL import Image

from pcl.data.device_input import EncodedImages, EncodedPairs
from pcl.data.transforms import (PretrainCropBoxes, eval_crop_transform, eval_transform, pretrain_crop_transform,
                                 pretrain_transform)

JPEG_SIZE, JPEG_QUALITY = (500, 375), 90  # a typical ImageNet photo, as gpu_check's pil section
DLE = "NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, DGX A100 80GB, pytorch-21.03 NGC"
A100_TRAIN_IMG_S = {"fp32": 938.0, "amp": 2470.0}  # ResNet-50 training images/s on one A100 (DLE): TF32, AMP
SCALING_8GPU = {"fp32": 7.72 / 8, "amp": 6.72 / 8}  # DDP efficiency on 8 GPUs (DLE), used for any G > 1
H100_OVER_A100 = 1.8  # assumed ratio, applied to the A100 numbers for --published-gpu h100
FP32_PEAK_TFLOPS = {"a100": 19.5, "h100": 67.0}  # NVIDIA datasheets: A100 SXM, H100 SXM non-tensor FP32
MOCO_OVER_TRAIN = 4 / 3  # MoCo step = query fwd + bwd (~3 forwards) + key fwd (1) vs a training step's 3 forwards
FORWARD_OVER_MOCO = 4.0  # forward-only images/s = 4 x MoCo pairs/s
ALLREDUCE_BUS_GBPS = 300.0  # assumed NCCL bus bandwidth within an NVLink node (H100 NVLink 4: 450 GB/s per direction,
# datasheet); below it on purpose
ALLREDUCE_LATENCY_S = 50e-6  # assumed NCCL latency per collective call
RESNET50_GMACS = 4.09  # torchvision's ResNet50_Weights.IMAGENET1K_V1 "GFLOPS" (multiply-adds) at 224 px
GPU_DECODE_MS = 0.10  # assumed GPU ms per image decoded (nvJPEG) and resized on the device; see DECODE_WHY
DECODE_WHY = ("assumed, not measured: 0.10 ms of the training GPU per image decoded, cropped and resized on the device "
              "(10,000 images/s per GPU), added in series to the step (no overlap with the training stream); "
              "torchvision's batched decode_jpeg asks nvJPEG for its hardware backend (decode_jpegs_cuda.cpp: "
              "NVJPEG_BACKEND_HARDWARE) for baseline JPEGs, so the entropy decode and IDCT run on the GPU's JPEG "
              "engine and the SMs convert colour and resize a ~0.19 MPixel image; gpu_check's fast_path section "
              "measures it (--gpu-json)")
GPU_AUGMENT_MS = 0.02  # assumed GPU ms per pair of --augment device's colour ops; see AUGMENT_WHY
AUGMENT_WHY = ("assumed, not measured: 0.02 ms of the training GPU per pair for --augment device's colour ops and "
               "normalisation, from memory traffic: ~20 elementwise passes over two 224 px fp32 crops (~24 MB) at "
               "~1.5 TB/s; gpu_check's device_aug section measures it (--gpu-json)")
FIELDS = ("decode", "pil_pair", "augment_pair", "pil_eval", "augment_eval", "bytes_pair", "bytes_image")


@dataclass
class CpuCosts:
    """CPU seconds per pair or per image on one core of this machine (one thread), each pipeline's read and decode
    included (see the module docstring)."""
    decode_s: float
    pil_pair_s: float
    augment_pair_s: float
    pil_eval_s: float
    augment_eval_s: float
    bytes_pair_s: float
    bytes_image_s: float


@dataclass
class CpuRange:
    """The fastest (``low``) and the slowest (``high``) of ``rounds`` timed rounds, figure by figure."""
    low: CpuCosts
    high: CpuCosts
    rounds: list[CpuCosts]
    pairs: int


@dataclass
class GpuFigures:
    """Per-GPU figures and where each comes from. Rates are keyed "fp32" (the official path) and "amp" (--amp
    bf16 --channels-last); k-means rates "one_gpu" (the official backend on rank 0) and "ranks" (torch-ranks)."""
    moco_pairs_per_s: dict[str, float]
    step_source: str
    forward_images_per_s: dict[str, float]  # the E-step's feature pass (key encoder forward, eval mode)
    forward_source: str
    pcl_overhead: float  # fraction: PCL step time / MoCo step time - 1
    overhead_source: str
    kmeans_flops_per_s: dict[str, float]
    kmeans_source: dict[str, str]
    decode_s: float  # GPU seconds per image decoded + cropped/resized on the device (--decode device)
    decode_source: str
    augment_s: float  # GPU seconds per pair of the colour ops and normalisation (--augment device)
    augment_source: str


class _Files:
    """The base dataset EncodedPairs / EncodedImages wrap: ``samples`` only (every file here is a JPEG they take)."""

    def __init__(self, paths: list[str]) -> None:
        self.samples = [(path, 0) for path in paths]

    def __len__(self) -> int:
        return len(self.samples)


def _write_jpeg(rng: np.random.Generator, path: str) -> None:
    """A 500 x 375 JPEG of quality 90 with smooth (photo-like, not noise) content: photo-like sizes and decode times."""
    w, h = JPEG_SIZE
    smooth = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((w, h), Image.BILINEAR).save(path, quality=JPEG_QUALITY)


def _decode(path: str) -> Image.Image:
    """Read and decode a JPEG as a loader worker does (torchvision's pil_loader)."""
    with open(path, "rb") as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def _seconds(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _one_round(paths: list[str], on_image: dict[str, Callable], pairs: EncodedPairs,
               images: EncodedImages) -> CpuCosts:
    """Every pipeline once over ``paths``: seconds per item. A decoding pipeline's figure is the decode plus its
    transforms of that decoded image (a worker decodes once, then crops twice for a pair)."""
    acc = dict.fromkeys(FIELDS, 0.0)
    for i, path in enumerate(paths):
        t, img = _seconds(lambda: _decode(path))
        acc["decode"] += t
        for name, fn in on_image.items():
            acc[name] += t + _seconds(lambda: fn(img))[0]
        acc["bytes_pair"] += _seconds(lambda: pairs[i])[0]
        acc["bytes_image"] += _seconds(lambda: images[i])[0]
    return CpuCosts(**{f"{name}_s": total / len(paths) for name, total in acc.items()})


def measure_cpu(pairs: int, rounds: int, seed: int = 0) -> CpuRange:
    """Time every pipeline on ``pairs`` synthesised JPEGs on one thread, ``rounds`` times after one warm-up round
    (imports, allocator, page cache); low / high = the fastest / slowest round of each figure."""
    official, crop = pretrain_transform(aug_plus=True, size=224), pretrain_crop_transform(224)
    on_image = {"pil_pair": lambda img: (official(img), official(img)),
                "augment_pair": lambda img: (crop(img), crop(img)),
                "pil_eval": eval_transform(224), "augment_eval": eval_crop_transform(224)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(seed)
            paths = [os.path.join(tmp, f"{i}.jpg") for i in range(pairs)]
            for path in paths:
                _write_jpeg(rng, path)
            files = _Files(paths)
            encoded = EncodedPairs(files, PretrainCropBoxes(224)), EncodedImages(files, eval_crop_transform(224))
            timed = [_one_round(paths, on_image, *encoded) for _ in range(rounds + 1)][1:]
    finally:
        torch.set_num_threads(threads)
    names = [f.name for f in fields(CpuCosts)]
    low = CpuCosts(**{name: min(getattr(r, name) for r in timed) for name in names})
    high = CpuCosts(**{name: max(getattr(r, name) for r in timed) for name in names})
    return CpuRange(low, high, timed, pairs)


def kmeans_flops(n: int, ks: list[int] | tuple[int, ...], dim: int, niter: int, nredo: int) -> float:
    """FLOPs of Lloyd's assignment (the N x k distance products) over every granularity: 2 N k d niter nredo each."""
    return float(sum(2.0 * n * k * dim * niter * nredo for k in ks))


def pcl_overhead_estimate(r: int, dim: int, granularities: int) -> float:
    """ProtoNCE's extra FLOPs per pair over a MoCo v2 step's (a lower bound: sampling and gathers are not FLOPs):
    per granularity 1 + r prototype logits of d products each, forward and backward (x3), vs 4 ResNet-50 forwards."""
    extra = granularities * 3 * 2.0 * (r + 1) * dim
    return extra / (FORWARD_OVER_MOCO * 2.0 * RESNET50_GMACS * 1e9)


def published_gpu(gpu: str, r: int, dim: int, granularities: int, efficiency: float) -> GpuFigures:
    """The GPU figures from published numbers (see the constants' sources), for an A100 or an H100; the device
    input's figures assumed (DECODE_WHY, AUGMENT_WHY)."""
    ratio = H100_OVER_A100 if gpu == "h100" else 1.0
    pairs = {mode: ips * ratio / MOCO_OVER_TRAIN for mode, ips in A100_TRAIN_IMG_S.items()}
    how = f" x {H100_OVER_A100} (assumed H100/A100)" if gpu == "h100" else ""
    step = (f"published, not measured ({gpu.upper()}: A100 ResNet-50 training, 1 GPU, 938 img/s TF32 and 2470 img/s "
            f"AMP ({DLE}){how}, / {MOCO_OVER_TRAIN:.2f} for a MoCo step)")
    kmeans = (f"published, not measured ({gpu.upper()} fp32 peak {FP32_PEAK_TFLOPS[gpu]:.1f} TFLOP/s, NVIDIA "
              f"datasheet, x {efficiency:.0%} assumed efficiency)")
    return GpuFigures(
        moco_pairs_per_s=pairs, step_source=step,
        forward_images_per_s={mode: FORWARD_OVER_MOCO * v for mode, v in pairs.items()},
        forward_source=f"derived (forward = MoCo step / {FORWARD_OVER_MOCO:.0f}: query fwd + bwd ~ 3 forwards + key "
                       f"fwd) from the {step}",
        pcl_overhead=pcl_overhead_estimate(r, dim, granularities),
        overhead_source="estimated (ProtoNCE FLOPs over ResNet-50's 4.09 GMACs, torchvision docs; a lower bound)",
        kmeans_flops_per_s=dict.fromkeys(("one_gpu", "ranks"), FP32_PEAK_TFLOPS[gpu] * 1e12 * efficiency),
        kmeans_source=dict.fromkeys(("one_gpu", "ranks"), kmeans),
        decode_s=GPU_DECODE_MS / 1e3, decode_source=DECODE_WHY,
        augment_s=GPU_AUGMENT_MS / 1e3, augment_source=AUGMENT_WHY)


def _ok(sections: dict, name: str) -> dict:
    """A gpu_check section that ran (empty when it is absent, failed or was skipped)."""
    sec = sections.get(name) or {}
    return {} if "error" in sec or "skipped" in sec else sec


def _kmeans_tflops(sec: dict) -> float | None:
    """Effective TFLOP/s of a gpu_check k-means section (its own figure, or 2 N k d 20 nredo over its seconds)."""
    if "kmeans_tflops" in sec:
        return float(sec["kmeans_tflops"])
    runs = sorted(int(key[len("seconds_nredo"):]) for key in sec if key.startswith("seconds_nredo"))
    if not runs:
        return None
    per_k = sec[f"seconds_nredo{runs[-1]}"]
    return kmeans_flops(sec["n"], [int(k) for k in per_k], 128, 20, runs[-1]) / sum(per_k.values()) / 1e12


def flat_from_gpu_check(data: dict, path: str) -> dict:
    """gpu_check.py's JSON as the flat keys (see benchmarks/cost_model.py's docstring), each with the section it
    came from in ``sections``."""
    sec, flat, where = data["sections"], {"sections": {}}, {}
    flat["gpu"] = data.get("hardware", "?").split(", ")[-1] if data.get("device", "cuda") != "cpu" else "the CPU"
    thr = _ok(sec, "throughput")
    ips = thr.get("images_per_s") or {}
    if "fp32" not in ips or thr.get("fast_variant") not in ips:
        raise SystemExit(f"cost_model: {path} has no throughput section with fp32 and its fast variant")
    sizes = data.get("sizes", {})
    if sizes.get("arch") != "resnet50" or sizes.get("image_size") != 224:
        print(f"warning: {path} timed {sizes.get('arch')} at {sizes.get('image_size')} px, not ResNet-50 at 224 px "
              f"(gpu_check --smoke?): the projection uses it as it is")
    where.update(moco_pairs_per_s_fp32=(ips["fp32"], "throughput"),
                 moco_pairs_per_s_fast=(ips[thr["fast_variant"]], "throughput"))
    if "overhead_pct" in _ok(sec, "overhead"):
        where["pcl_overhead_pct"] = (sec["overhead"]["overhead_pct"], "overhead")
    for name, key in (("kmeans", "kmeans_tflops"), ("kmeans_ranks", "kmeans_tflops_ranks")):
        tflops = _kmeans_tflops(_ok(sec, name))
        if tflops:
            where[key] = (tflops, f"{name}, backend {sec[name].get('backend', '?')}")
    forward = _ok(sec, "estep").get("images_per_s") or {}
    if "fp32" in forward and "bf16" in forward:
        where.update(forward_images_per_s_fp32=(forward["fp32"], "estep"),
                     forward_images_per_s_fast=(forward["bf16"], "estep"))
    aug = _ok(sec, "device_aug").get("device_images_per_s")
    if aug:
        where["gpu_augment_ms"] = (2e3 / aug, "device_aug: 2 crops at its images/s")
    train, plain = _ok(sec, "fast_path").get("train") or {}, ips.get(f"{thr['fast_variant']}+bn_splits8")
    if train.get("images_per_s") and plain:  # the step fed by --decode device against the same step from memory
        pair_ms = 1e3 * max((1 - train.get("input_wait", 0.0)) / train["images_per_s"] - 1 / plain, 0.0)
        augment = where.get("gpu_augment_ms", (GPU_AUGMENT_MS,))[0]
        where["gpu_decode_ms"] = (max(pair_ms - augment, 0.0), "fast_path: the --decode device step's busy time per "
                                  "pair over throughput's bn_splits8 step, less the colour ops")
    for key, (value, section) in where.items():
        flat[key], flat["sections"][key] = float(value), section
    return flat


def gpu_from_json(path: str, fallback: GpuFigures) -> GpuFigures:
    """GPU figures from gpu_check.py's JSON or a flat JSON (keys in cost_model.py's docstring); a figure the file
    lacks keeps ``fallback``'s value and source."""
    with open(path) as f:
        data = json.load(f)
    flat = flat_from_gpu_check(data, path) if "sections" in data else data
    missing = [k for k in ("moco_pairs_per_s_fp32", "moco_pairs_per_s_fast") if k not in flat]
    if missing:
        raise SystemExit(f"cost_model: {path} lacks {missing} (see the keys in benchmarks/cost_model.py's docstring)")

    def src(key: str) -> str:
        section = flat.get("sections", {}).get(key)
        return (f"measured on GPU ({flat.get('gpu', 'unnamed')}, {os.path.basename(path)}"
                f"{', ' + section if section else ''})")

    out = replace(fallback, kmeans_flops_per_s=dict(fallback.kmeans_flops_per_s),
                  kmeans_source=dict(fallback.kmeans_source))
    out.moco_pairs_per_s = {"fp32": float(flat["moco_pairs_per_s_fp32"]), "amp": float(flat["moco_pairs_per_s_fast"])}
    out.step_source = src("moco_pairs_per_s_fp32")
    if "forward_images_per_s_fp32" in flat and "forward_images_per_s_fast" in flat:
        out.forward_images_per_s = {"fp32": float(flat["forward_images_per_s_fp32"]),
                                    "amp": float(flat["forward_images_per_s_fast"])}
        out.forward_source = src("forward_images_per_s_fp32")
    else:
        out.forward_images_per_s = {mode: FORWARD_OVER_MOCO * v for mode, v in out.moco_pairs_per_s.items()}
        out.forward_source = f"derived (forward = MoCo step / {FORWARD_OVER_MOCO:.0f}) from the {out.step_source}"
    if "pcl_overhead_pct" in flat:
        out.pcl_overhead, out.overhead_source = max(float(flat["pcl_overhead_pct"]), 0.0) / 100, src("pcl_overhead_pct")
    ranks = "kmeans_tflops_ranks" if "kmeans_tflops_ranks" in flat else "kmeans_tflops"  # else the same k-means
    for backend, key in (("one_gpu", "kmeans_tflops"), ("ranks", ranks)):
        if key in flat:
            out.kmeans_flops_per_s[backend], out.kmeans_source[backend] = float(flat[key]) * 1e12, src(key)
    if "gpu_decode_ms" in flat:
        out.decode_s, out.decode_source = float(flat["gpu_decode_ms"]) / 1e3, src("gpu_decode_ms")
    if "gpu_augment_ms" in flat:
        out.augment_s, out.augment_source = float(flat["gpu_augment_ms"]) / 1e3, src("gpu_augment_ms")
    return out
