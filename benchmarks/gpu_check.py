#!/usr/bin/env python
"""The prepared GPU check: everything the paper's run needs from a GPU, measured in one command.

Sections (each timed and recorded on its own; a failing section is reported and the others still run):
1. tests: the suite's cuda-marked tests (k-means, sampling, logits, chunked ProtoNCE, a 2-epoch run with an
   E-step, fp32 and bf16 + channels-last) on this device;
2. throughput: the pretraining step (query fwd+bwd, key fwd, InfoNCE, SGD) on ImageNet-sized synthetic data
   (ResNet-50, 224 px, batch 64), fp32 vs --amp bf16 --channels-last: images/s and the ratio (goal >= 2x);
3. overhead: PCL step vs MoCo step at the paper's r = 16384 and k = 25k/50k/100k over N = 1.28M (goal <= 5 %);
4. sampling: negative-prototype sampling + ProtoNCE logits for one granularity at r = 16384, k = 100k, per-GPU
   batch 32 and 256 (goal < 1 ms);
5. kmeans: the E-step's k-means on N = 1,281,167 x 128 at k = 25k/50k/100k, niter 20, nredo 1 and 5, with the
   backend ``auto`` picks here (goal: all three with nredo 5 in < 60 s on one H100);
6. pil: the official PIL augmentation (MoCo v2, 224 px) from synthesised ImageNet-sized JPEGs (500 x 375),
   images/s on one CPU core: how many cores one GPU step needs.

``--cpu`` runs every section on the CPU at toy sizes (the suite runs it, so the script cannot rot).
Writes one JSON (``--out``, default $OUT/gpu_check.json when $OUT is set) and prints a markdown table.

    scripts/gpu_check.sh            # on a GPU machine: PYTHONPATH=. python benchmarks/gpu_check.py
    scripts/gpu_check.sh --cpu      # the CPU fallback, about a minute
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_estep import synthetic_features  # noqa: E402
from bench_step import overhead, throughput  # noqa: E402
from common import hardware, write_json  # noqa: E402
from pcl.cluster import kmeans, resolve_backend  # noqa: E402
from pcl.loss import prototype_logits, sample_negative_prototypes  # noqa: E402
from pcl.settings import parse_list  # noqa: E402

FULL = dict(arch="resnet50", width=64, stem="standard", image_size=224, batch=64, r=16384,
            ks="25000,50000,100000", n=1_281_167, steps=10, rounds=3, kmeans_n=1_281_167, kmeans_nredo=(1, 5),
            pil_images=64, pil_size=(500, 375))
TOY = dict(arch="resnet18", width=8, stem="small", image_size=32, batch=16, r=256, ks="40,80,160", n=4096, steps=2,
           rounds=1, kmeans_n=4096, kmeans_nredo=(1, 2), pil_images=8, pil_size=(500, 375))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section_tests(device: torch.device, sizes: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if device.type == "cpu":
        env["PCL_TEST_DEVICE"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", os.path.join(ROOT, "tests")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    return {"ok": proc.returncode == 0, "summary": summary, "exit_code": proc.returncode}


def _step_opts(sizes: dict, device: torch.device, **extra) -> SimpleNamespace:
    return SimpleNamespace(arch=sizes["arch"], width=sizes["width"], stem=sizes["stem"], image_size=sizes["image_size"],
                           batch=sizes["batch"], bn_splits=1, r=sizes["r"], ks=sizes["ks"], n=sizes["n"],
                           steps=sizes["steps"], rounds=sizes["rounds"], device=str(device), **extra)


def section_throughput(device: torch.device, sizes: dict) -> dict:
    variants = "fp32,bf16+channels_last" if device.type == "cuda" else "fp32,bf16"  # channels-last: GPU only
    res = throughput(_step_opts(sizes, device, variants=variants), device)
    fast = "bf16+channels_last" if device.type == "cuda" else "bf16"
    return {"images_per_s": res["images_per_s"], "speedup": res["speedup_vs_fp32"].get(fast),
            "fast_variant": fast, "goal": ">= 2x", "ok": (res["speedup_vs_fp32"].get(fast) or 0) >= 2.0}


def section_overhead(device: torch.device, sizes: dict) -> dict:
    res = overhead(_step_opts(sizes, device), device)
    return {"moco_step_s": res["moco_step_s"], "pcl_step_s": res["pcl_step_s"], "overhead_pct": res["overhead_pct"],
            "goal": "<= 5 %", "ok": res["overhead_pct"] <= 5.0}


def _median_ms(fn: Callable[[], None], device: torch.device, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def section_sampling(device: torch.device, sizes: dict) -> dict:
    k, r, d = 100_000, 16_384, 128
    gen = torch.Generator(device=device).manual_seed(0)
    c = F.normalize(torch.randn(k, d, device=device), dim=1)
    phi = 0.1 + 0.2 * torch.rand(k, device=device)
    out = {}
    for b in (32, 256):
        q = F.normalize(torch.randn(b, d, device=device), dim=1)
        pos = torch.randint(k, (b,), device=device)

        def step() -> None:
            prototype_logits(q, c, phi, pos, sample_negative_prototypes(k, pos, r, gen))

        out[f"ms_per_granularity_b{b}"] = _median_ms(step, device)
    worst = max(out.values())
    return {**out, "k": k, "r": r, "goal": "< 1 ms", "ok": worst < 1.0}


def section_kmeans(device: torch.device, sizes: dict) -> dict:
    ks = parse_list(sizes["ks"], "ks")
    x = synthetic_features(sizes["kmeans_n"], 128, centres=max(ks) // 4).to(device)
    backend, why = resolve_backend("auto", device)
    out = {"backend": backend, "why": why, "n": x.shape[0]}
    for nredo in sizes["kmeans_nredo"]:
        per_k = []
        for g, k in enumerate(ks):
            sync(device)
            start = time.perf_counter()
            kmeans(x, k, seed=g, niter=20, nredo=nredo, backend=backend)
            sync(device)
            per_k.append(time.perf_counter() - start)
        out[f"seconds_nredo{nredo}"] = dict(zip(map(str, ks), per_k))
        out[f"total_seconds_nredo{nredo}"] = sum(per_k)
    last = sizes["kmeans_nredo"][-1]
    out.update(goal=f"all three, nredo {last}: < 60 s", ok=out[f"total_seconds_nredo{last}"] < 60.0)
    return out


def section_pil(device: torch.device, sizes: dict) -> dict:
    import numpy as np
    from PIL import Image

    from pcl.data import pretrain_transform

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(sizes["pil_images"]):
            w, h = sizes["pil_size"]
            smooth = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)  # JPEG-like content, not noise
            img = Image.fromarray(smooth).resize((w, h), Image.BILINEAR)
            path = os.path.join(tmp, f"{i}.jpg")
            img.save(path, quality=90)
            paths.append(path)
        transform = pretrain_transform(aug_plus=True, size=224)
        start = time.perf_counter()
        for path in paths:
            with open(path, "rb") as f:
                img = Image.open(io.BytesIO(f.read())).convert("RGB")
            transform(img), transform(img)  # two crops per image, as pretraining
        seconds = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    return {"images_per_s_per_core": len(paths) / seconds, "jpeg_size": list(sizes["pil_size"]), "ok": True}


SECTIONS = {"tests": section_tests, "throughput": section_throughput, "overhead": section_overhead,
            "sampling": section_sampling, "kmeans": section_kmeans, "pil": section_pil}


def row(name: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | ERROR: {r['error']} | | {r['seconds']:.0f} |"
    if name == "tests":
        text = r["summary"]
    elif name == "throughput":
        ips = r["images_per_s"]
        text = ", ".join(f"{k} {v:.0f} img/s" for k, v in ips.items()) + f"; {r['fast_variant']} / fp32 = {r['speedup']:.2f}x"
    elif name == "overhead":
        text = f"MoCo {r['moco_step_s'] * 1e3:.1f} ms, PCL {r['pcl_step_s'] * 1e3:.1f} ms per step: {r['overhead_pct']:+.1f} %"
    elif name == "sampling":
        text = f"batch 32: {r['ms_per_granularity_b32']:.3f} ms, batch 256: {r['ms_per_granularity_b256']:.3f} ms"
    elif name == "kmeans":
        text = f"{r['backend']} (N={r['n']}): " + "; ".join(
            f"nredo {key[len('total_seconds_nredo'):]}: {v:.1f} s" for key, v in r.items() if key.startswith("total_seconds"))
    else:
        text = f"{r['images_per_s_per_core']:.1f} images/s per core (two 224 px crops each)"
    goal = r.get("goal", "")
    return f"| {name} | {text} | {goal}{' ok' if r.get('ok') else ' MISSED' if goal else ''} | {r['seconds']:.0f} |"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (what CI runs)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else benchmarks/results/)")
    opts = p.parse_args(argv)
    if not opts.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --cpu for the CPU fallback")
    device = torch.device("cpu" if opts.cpu else "cuda")
    sizes = TOY if opts.cpu else FULL
    results: dict = {"hardware": hardware(device), "torch": torch.__version__, "device": str(device),
                     "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}, "sections": {}}
    for name in parse_list(opts.sections, "--sections", str):
        start = time.perf_counter()
        try:
            res = SECTIONS[name](device, sizes)
        except Exception as e:  # report and go on: one broken section must not hide the others' numbers
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", "ok": False}
        res["seconds"] = time.perf_counter() - start
        results["sections"][name] = res
        print(f"[gpu_check] {name}: {json.dumps(res)}", flush=True)
    table = ["| check | measured | goal | seconds |", "|---|---|---|---|"]
    table += [row(name, r) for name, r in results["sections"].items()]
    results["table"] = "\n".join(table)
    print(f"\n{results['hardware']}\n\n{results['table']}")
    out = opts.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else
                       os.path.join(ROOT, "benchmarks", "results", f"gpu_check_{device.type}.json"))
    write_json(results, out)
    return results


if __name__ == "__main__":
    sys.exit(0 if all(r.get("ok", False) or "goal" in r for r in main()["sections"].values()) else 1)
