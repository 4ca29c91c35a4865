#!/usr/bin/env python
"""The prepared GPU check: everything the paper's run needs from a GPU, measured in one command.

Sections (each timed and recorded on its own; a failing section is reported and the others still run). The times
are projections for one H100 (6 to 7 minutes in all), not measurements; ``--cpu`` (toy sizes) takes 1 to 3 minutes
on 2 CPU cores, most of it the tests section (nccl ~30 s, loader ~5 s, syncs, faiss and the rest a few seconds).
1. tests (~60 s): the suite's cuda-marked tests (k-means, sampling, logits, chunked ProtoNCE, a 2-epoch run with an
   E-step, fp32 and bf16 + channels-last) on this device;
2. throughput (~40 s): the pretraining step (query fwd+bwd, key fwd, InfoNCE, SGD) on ImageNet-sized synthetic data
   (ResNet-50, 224 px, batch 64), fp32 vs --amp bf16 --channels-last: images/s and the ratio (goal >= 2x); also
   both with --bn-splits 8 (SplitBatchNorm, the single-GPU default; the others use plain BN as under DDP);
3. overhead (~30 s): PCL step vs MoCo step at r = 16384 and k = 25k/50k/100k over N = 1.28M (goal <= 5 %);
4. sampling (~5 s): negative-prototype sampling + ProtoNCE logits for one granularity at r = 16384, k = 100k,
   per-GPU batch 32 and 256 (goal < 1 ms);
5. kmeans (~90 s): the E-step's k-means on N = 1,281,167 x 128 at k = 25k/50k/100k, niter 20, nredo 1 and 5, with
   the backend ``auto`` picks here, and the peak GPU memory per k, features included (goal: all three with nredo 5 in < 60 s);
6. pil (~5 s): the official PIL augmentation (MoCo v2, 224 px) from synthesised ImageNet-sized JPEGs (500 x 375),
   images/s on one CPU core: how many cores one GPU step needs;
7. nccl (~60 s, bounded at 120 s): main_pcl.py in subprocesses through the official launcher
   (--multiprocessing-distributed --nproc 1: a 1-process NCCL group over CUDA tensors; gloo on the CPU) with
   --amp fp16 (GradScaler) and the torch k-means: 2 epochs (exit 0), then --epochs 50 stopped by SIGTERM to the
   launcher after its first epoch (exit 75, a checkpoint saved), then --resume auto --epochs 3 (exit 0, log.txt
   continued to 3 lines);
8. loader (~20 s): main_pcl.py DIR for 1 epoch on a generated JPEG ImageFolder (2 classes of 64 x 48 px), 2 loader
   workers, pinned memory and (GPU) --channels-last: images/s over the wall time, process start included;
9. faiss (~10 s): faiss k-means on the GPU (N = 200k x 128, k = 10k, nredo 1) when faiss with GPU support is
   installed, else recorded as untested (not a failure);
10. syncs (~10 s): host syncs per training step (torch.cuda.set_sync_debug_mode("warn"); on the CPU the
   host-copying Tensor calls) outside --print-freq steps (goal 0; ok at <= 1 per step);
11. device_aug (~10 s, a projection): ``--augment device``. (a) On one CPU core and the pil section's JPEGs, the
   loader worker's CPU per pair (decode + the official RandomResizedCrop + flip to uint8, twice:
   ``pretrain_crop_transform``) next to the official PIL MoCo v2 pipeline's, and their ratio (goal <= 40 %); the
   E-step's per-image eval crop (``eval_crop_transform`` vs ``eval_transform``) likewise. (b) On the device, the
   rest of the list (``TensorAugment(crop=False)``: colour jitter, grayscale, blur, normalisation; fp32)
   on a uint8 batch of 256 at 224 px: images/s, synchronised (keys ``worker_pair_ms``, ``official_pair_ms``,
   ``worker_over_official``, ``device_images_per_s``);
12. kmeans_ranks (~70 s, a projection): ``--kmeans-backend torch-ranks``: ``run_kmeans_across_ranks`` in a
   1-process group (nccl; gloo on the CPU) on the kmeans section's features, k = 25k/50k/100k one at a time,
   niter 20, nredo 1: seconds per k (``seconds_nredo1``, the kmeans section's format), FLOP/s as
   2 N k d niter nredo / seconds (``tflops_nredo1`` per k, ``kmeans_tflops`` over all three: cost_model.py's
   ``kmeans_tflops``); then ``run_kmeans(backend="torch")`` on the same input, timed, and its assignments compared,
   and the two bit-compared at the smallest k under torch.use_deterministic_algorithms (CUDA's index_add_ atomics
   otherwise make any two runs differ in the last bits).

``--cpu`` runs every section on the CPU at toy sizes (the suite runs it, so the script cannot rot).
Writes one JSON (``--out``, default $OUT/gpu_check.json when $OUT is set) and prints a markdown table.

    scripts/gpu_check.sh            # on a GPU machine: PYTHONPATH=. python benchmarks/gpu_check.py
    scripts/gpu_check.sh --cpu      # the CPU fallback, 1 to 3 minutes
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import signal
import socket
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
from bench_step import host_syncs, overhead, throughput  # noqa: E402
from common import hardware, write_json  # noqa: E402
from pcl.checkpoint import preempt_path  # noqa: E402
from pcl.cluster import kmeans, resolve_backend, run_kmeans, run_kmeans_across_ranks  # noqa: E402
from pcl.loss import prototype_logits, sample_negative_prototypes  # noqa: E402
from pcl.settings import parse_list  # noqa: E402

FULL = dict(arch="resnet50", width=64, stem="standard", image_size=224, batch=64, r=16384,
            ks="25000,50000,100000", n=1_281_167, steps=10, rounds=3, kmeans_n=1_281_167, kmeans_nredo=(1, 5),
            pil_images=64, pil_size=(500, 375), cli_timeout=120, nccl_budget=120, loader_per_class=256,
            faiss_n=200_000, faiss_k=10_000, aug_size=224, aug_batch=256, aug_rounds=3)
TOY = dict(arch="resnet18", width=8, stem="small", image_size=32, batch=16, r=256, ks="40,80,160", n=4096, steps=2,
           rounds=1, kmeans_n=4096, kmeans_nredo=(1, 2), pil_images=8, pil_size=(500, 375), cli_timeout=240,
           nccl_budget=400, loader_per_class=48, faiss_n=4096, faiss_k=64, aug_size=64, aug_batch=32, aug_rounds=2)
TINY_CLI = ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "-a", "resnet18", "--width", "4",
            "--stem", "small", "--epochs", "2", "--warmup-epoch", "1", "-b", "64", "--pcl-r", "256",
            "--num-cluster", "10,20", "--kmeans-nredo", "1", "--workers", "0", "--no-progress"]


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
    variants = ("fp32,bf16+channels_last,bn_splits8,bf16+channels_last+bn_splits8" if device.type == "cuda" else
                "fp32,bf16,bn_splits8")  # channels-last: GPU only
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
        per_k, peak = [], []
        for g, k in enumerate(ks):
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            kmeans(x, k, seed=g, niter=20, nredo=nredo, backend=backend)
            sync(device)
            per_k.append(time.perf_counter() - start)
            peak.append(torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None)
        out[f"seconds_nredo{nredo}"] = dict(zip(map(str, ks), per_k))
        out[f"peak_gpu_gb_nredo{nredo}"] = dict(zip(map(str, ks), peak))
        out[f"total_seconds_nredo{nredo}"] = sum(per_k)
    last = sizes["kmeans_nredo"][-1]
    out.update(goal=f"all three, nredo {last}: < 60 s", ok=out[f"total_seconds_nredo{last}"] < 60.0)
    return out


def _write_jpeg(rng, size: tuple[int, int], path: str) -> None:
    """A w x h JPEG with photo-like (smooth) content, not noise: JPEG sizes and decode times as for photos."""
    import numpy as np
    from PIL import Image

    w, h = size
    smooth = rng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((w, h), Image.BILINEAR).save(path, quality=90)


def _jpegs(folder: str, sizes: dict) -> list[str]:
    """The pil and device_aug sections' images: ``pil_images`` synthetic JPEGs of ``pil_size`` (seed 0) in FOLDER."""
    import numpy as np

    rng = np.random.default_rng(0)
    paths = [os.path.join(folder, f"{i}.jpg") for i in range(sizes["pil_images"])]
    for path in paths:
        _write_jpeg(rng, sizes["pil_size"], path)
    return paths


def section_pil(device: torch.device, sizes: dict) -> dict:
    from PIL import Image

    from pcl.data import pretrain_transform

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _jpegs(tmp, sizes)
        transform = pretrain_transform(aug_plus=True, size=224)
        start = time.perf_counter()
        for path in paths:
            with open(path, "rb") as f:
                img = Image.open(io.BytesIO(f.read())).convert("RGB")
            transform(img), transform(img)  # two crops per image, as pretraining
        seconds = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    return {"images_per_s_per_core": len(paths) / seconds, "jpeg_size": list(sizes["pil_size"]), "ok": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(argv: list[str], exp: str, timeout: float, stop_when: str | None = None) -> tuple[int | str, float]:
    """``main_pcl.py ARGV --exp-dir EXP`` in a subprocess of its own process group, killed whole after
    ``timeout`` s: (exit code, or "timeout", and seconds). ``stop_when``: SIGTERM the launcher only (as
    ``kill PID`` / a scheduler does) once that file exists. Its output goes to EXP.out, printed on failure."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start, signalled = time.perf_counter(), False
    with open(exp + ".out", "a") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main_pcl.py"), *argv, "--exp-dir", exp], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and time.perf_counter() - start < timeout:
            if stop_when is not None and not signalled and os.path.exists(stop_when):
                proc.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.1)
        timed_out = proc.poll() is None
        if timed_out:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    code = "timeout" if timed_out else proc.returncode
    if code not in (0, 75):
        print(f"[gpu_check] main_pcl.py {' '.join(argv)}: exit {code}\n{open(exp + '.out').read()[-3000:]}")
    return code, time.perf_counter() - start


def _lines(path: str) -> int:
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def section_nccl(device: torch.device, sizes: dict) -> dict:
    cuda, deadline = device.type == "cuda", time.perf_counter() + sizes["nccl_budget"]
    speed = ["--amp", "fp16", "--kmeans-backend", "torch"] if cuda else ["--amp", "none", "--cpu"]
    out: dict = {"backend": "nccl" if cuda else "gloo", "flags": speed}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, *extra: str, stop_when: str | None = None) -> None:
            launcher = ["--dist-url", f"tcp://127.0.0.1:{_free_port()}", "--multiprocessing-distributed",
                        "--world-size", "1", "--rank", "0", "--nproc", "1"]
            budget = max(min(sizes["cli_timeout"], deadline - time.perf_counter()), 1.0)
            exp_dir = os.path.join(tmp, name.split("_")[0])  # sigterm_resume continues in sigterm/
            out[f"{name}_exit"], out[f"{name}_seconds"] = _cli([*TINY_CLI, *launcher, *speed, *extra], exp_dir,
                                                              budget, stop_when)

        run("two_epochs")
        exp = os.path.join(tmp, "sigterm")
        log = os.path.join(exp, "log.txt")
        run("sigterm", "--epochs", "50", stop_when=log)
        out["log_lines_at_stop"] = stopped = _lines(log)
        out["checkpoint_saved"] = os.path.exists(log) and (os.path.exists(preempt_path(exp)) or any(
            os.path.getmtime(p) >= os.path.getmtime(log) for p in glob.glob(os.path.join(exp, "checkpoint_*.pth.tar"))))
        out["resume_epochs"] = epochs = max(3, stopped + 1)  # 3 unless the stop came late (a fast GPU)
        run("sigterm_resume", "--epochs", str(epochs), "--resume", "auto")
        out["log_lines_after_resume"] = _lines(log)
    out["ok"] = (out["two_epochs_exit"] == 0 and out["sigterm_exit"] == 75 and out["checkpoint_saved"]
                 and out["sigterm_resume_exit"] == 0 and out["log_lines_after_resume"] == epochs > stopped)
    return out


def section_loader(device: torch.device, sizes: dict) -> dict:
    import numpy as np

    cuda, per_class, rng = device.type == "cuda", sizes["loader_per_class"], np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for split, n in (("train", per_class), ("val", max(per_class // 4, 2))):
            for c in range(2):
                os.makedirs(os.path.join(tmp, "data", split, f"class{c}"))
                for i in range(n):
                    _write_jpeg(rng, (64, 48), os.path.join(tmp, "data", split, f"class{c}", f"{i}.jpg"))
        flags = ["--channels-last", "--kmeans-backend", "torch"] if cuda else ["--cpu"]
        code, seconds = _cli([os.path.join(tmp, "data"), "--epochs", "1", "--warmup-epoch", "0", "--workers", "2",
                              "--image-size", "32", "-a", "resnet18", "--width", "4", "--stem", "small", "-b", "32",
                              "--pcl-r", "64", "--num-cluster", "4,8", "--kmeans-nredo", "1", "--no-progress", *flags],
                             os.path.join(tmp, "exp"), sizes["cli_timeout"])
        saved = os.path.exists(os.path.join(tmp, "exp", "checkpoint_0000.pth.tar"))
    return {"images": 2 * per_class, "images_per_s": 2 * per_class / seconds, "exit": code, "workers": 2,
            "pin_memory": torch.cuda.is_available(), "flags": flags, "ok": code == 0 and saved}


def section_faiss(device: torch.device, sizes: dict) -> dict:
    try:
        import faiss

        gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # not installed, or a build that cannot load here
        return {"status": "faiss-GPU: untested (faiss is not installed here)", "ok": True}
    if device.type == "cuda" and gpus == 0:
        return {"status": "faiss-GPU: untested (this faiss has no GPU support)", "ok": True}
    n, k = sizes["faiss_n"], sizes["faiss_k"]
    x = synthetic_features(n, 128, centres=k // 4).to(device)
    sync(device)
    start = time.perf_counter()
    kmeans(x, k, seed=0, niter=20, nredo=1, backend="faiss")
    sync(device)
    where = "GPU" if device.type == "cuda" else "CPU (the GPU run times it on the GPU)"
    return {"status": f"faiss on the {where}", "kmeans_seconds": time.perf_counter() - start, "n": n, "k": k,
            "ok": True}


def section_syncs(device: torch.device, sizes: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = host_syncs(device, tmp)
    return {**res, "goal": "0 per step outside --print-freq steps", "ok": res["syncs_per_step"] <= 1}


def _decode(path: str):
    """Read and decode a JPEG as a loader worker does (torchvision's pil_loader)."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def _worker_seconds(paths: list[str], pipelines: dict[str, Callable], rounds: int) -> dict[str, float]:
    """CPU seconds per image of each pipeline on one thread, the decode counted once in each (a worker decodes
    once, then transforms); ``rounds`` timed rounds after one warm-up round, the fastest counts (the least
    disturbed by other work on shared cores)."""
    best: dict[str, float] = {}
    for r in range(rounds + 1):
        acc = dict.fromkeys(["decode", *pipelines], 0.0)
        for path in paths:
            start = time.perf_counter()
            img = _decode(path)
            acc["decode"] += time.perf_counter() - start
            for name, fn in pipelines.items():
                start = time.perf_counter()
                fn(img)
                acc[name] += time.perf_counter() - start
        if r:  # round 0 warms up (imports, allocator, page cache)
            for name, total in acc.items():
                best[name] = min(best.get(name, float("inf")), total / len(paths))
    return {name: best["decode"] + s if name != "decode" else s for name, s in best.items()}


def section_device_aug(device: torch.device, sizes: dict) -> dict:
    """``--augment device``: (a) the loader worker's CPU per pair (decode + the official RandomResizedCrop + flip to
    uint8, twice: ``pretrain_crop_transform``) next to the official PIL MoCo v2 pipeline's, on one core and the
    pil section's JPEGs (and the E-step's per-image eval crop likewise); (b) the colour ops and normalisation on
    the device (``TensorAugment(crop=False)``, MoCo v2, fp32) on a uint8 batch: images/s, synchronised."""
    from pcl.data import pretrain_transform
    from pcl.data.tensor_augment import TensorAugment
    from pcl.data.transforms import eval_crop_transform, eval_transform, pretrain_crop_transform

    official, crop = pretrain_transform(aug_plus=True, size=224), pretrain_crop_transform(224)
    pipelines = {"official_pair": lambda img: (official(img), official(img)),
                 "worker_pair": lambda img: (crop(img), crop(img)),
                 "official_eval": eval_transform(224), "worker_eval": eval_crop_transform(224)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = _jpegs(tmp, sizes)
            cpu = _worker_seconds(paths, pipelines, sizes["aug_rounds"])
    finally:
        torch.set_num_threads(threads)
    ratio = cpu["worker_pair"] / cpu["official_pair"]
    size, b = sizes["aug_size"], sizes["aug_batch"]
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device, generator=gen)
    augment = TensorAugment(size, aug_plus=True, crop=False)
    out = augment(images, gen)
    finite = tuple(out.shape) == (b, 3, size, size) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    ms = _median_ms(lambda: augment(images, gen), device, repeats=20)
    return {"jpegs": len(paths), "jpeg_size": list(sizes["pil_size"]),
            "rounds": sizes["aug_rounds"], "decode_ms": cpu["decode"] * 1e3,
            "official_pair_ms": cpu["official_pair"] * 1e3, "worker_pair_ms": cpu["worker_pair"] * 1e3,
            "worker_over_official": ratio, "official_pairs_per_s_per_core": 1.0 / cpu["official_pair"],
            "worker_pairs_per_s_per_core": 1.0 / cpu["worker_pair"],
            "official_eval_ms": cpu["official_eval"] * 1e3, "worker_eval_ms": cpu["worker_eval"] * 1e3,
            "eval_worker_over_official": cpu["worker_eval"] / cpu["official_eval"],
            "device_mode": "torchvision, aug_plus, fp32", "device_size": size, "device_batch": b,
            "device_ms_per_batch": ms, "device_images_per_s": b / (ms / 1e3), "device_output_finite": finite,
            "goal": "worker CPU per pair <= 40 % of official", "ok": finite and ratio <= 0.4}


KMEANS_TEMPERATURE = 0.2  # --temperature's default: phi's mean (the comparison covers phi's inputs, not its scale)


def section_kmeans_ranks(device: torch.device, sizes: dict) -> dict:
    """``--kmeans-backend torch-ranks``: run_kmeans_across_ranks in a 1-process group (nccl on CUDA, gloo on the
    CPU: its all-reduces and the final gather really run) on the kmeans section's features, one granularity at a
    time (seed g, as granularity g of one call), niter 20, nredo 1, timed synchronised; then run_kmeans(backend=
    "torch") on the same input, timed alike, and its assignments compared. On CUDA index_add_'s float atomics
    make two runs of either differ in the last bits (and so a few borderline assignments), so the bit-equality
    of the two paths is also checked at the smallest k with torch.use_deterministic_algorithms (what ``ok``
    requires). FLOP/s: 2 N k d niter nredo / seconds, as benchmarks/cost_model.py counts the E-step's k-means."""
    import warnings

    import torch.distributed as dist

    ks, niter, nredo = parse_list(sizes["ks"], "ks"), 20, 1
    x = synthetic_features(sizes["kmeans_n"], 128, centres=max(ks) // 4).to(device)
    n, d = x.shape
    index = torch.arange(n, device=device)
    cuda, own_group = device.type == "cuda", not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                world_size=1, rank=0)
    try:
        def timed(fn: Callable[[], object]) -> tuple[float, object, float | None]:
            sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            res = fn()
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
            return time.perf_counter() - start, res, peak

        def ranks(k: int, g: int):
            return run_kmeans_across_ranks(x, index, n, [k], KMEANS_TEMPERATURE, seed=g, niter=niter, nredo=nredo)

        def single(k: int, g: int):
            return run_kmeans(x, [k], KMEANS_TEMPERATURE, seed=g, niter=niter, nredo=nredo, backend="torch")

        secs, torch_secs, peaks, identical, agree = {}, {}, {}, {}, {}
        for g, k in enumerate(ks):
            secs[str(k)], a, peaks[str(k)] = timed(lambda: ranks(k, g))
            torch_secs[str(k)], b, _ = timed(lambda: single(k, g))
            identical[str(k)] = torch.equal(a.im2cluster[0], b.im2cluster[0])
            agree[str(k)] = float((a.im2cluster[0] == b.im2cluster[0]).double().mean())
        was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS without CUBLAS_WORKSPACE_CONFIG
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a, b = ranks(ks[0], 0), single(ks[0], 0)
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn_only)
        strict = (torch.equal(a.im2cluster[0], b.im2cluster[0]) and torch.equal(a.centroids[0], b.centroids[0])
                  and torch.equal(a.concentration[0], b.concentration[0]))
        backend = dist.get_backend()
    finally:
        if own_group:
            dist.destroy_process_group()
    flops = {k: 2.0 * n * int(k) * d * niter * nredo for k in secs}
    total = sum(secs.values())
    return {"backend": "torch-ranks", "process_group": f"{backend}, world 1", "n": n, "d": d, "niter": niter,
            "nredo": nredo, f"seconds_nredo{nredo}": secs, f"total_seconds_nredo{nredo}": total,
            f"tflops_nredo{nredo}": {k: flops[k] / s / 1e12 for k, s in secs.items()},
            "kmeans_tflops": sum(flops.values()) / total / 1e12, f"peak_gpu_gb_nredo{nredo}": peaks,
            f"torch_seconds_nredo{nredo}": torch_secs, "ranks_over_torch": total / sum(torch_secs.values()),
            "assignments_identical": identical, "assignments_agree_frac": agree,
            "deterministic_check": {"k": ks[0], "identical": strict},
            "ok": strict and (cuda or all(identical.values()))}  # the CPU's index_add_ is deterministic


SECTIONS = {"tests": section_tests, "throughput": section_throughput, "overhead": section_overhead,
            "sampling": section_sampling, "kmeans": section_kmeans, "pil": section_pil, "nccl": section_nccl,
            "loader": section_loader, "faiss": section_faiss, "syncs": section_syncs,
            "device_aug": section_device_aug, "kmeans_ranks": section_kmeans_ranks}


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
        peak = [v for key, per_k in r.items() if key.startswith("peak_gpu_gb") for v in per_k.values() if v is not None]
        text = f"{r['backend']} (N={r['n']}): " + "; ".join(
            f"nredo {key[len('total_seconds_nredo'):]}: {v:.1f} s" for key, v in r.items() if key.startswith("total_seconds"))
        text += f"; peak {max(peak):.1f} GB" if peak else ""
    elif name == "pil":
        text = f"{r['images_per_s_per_core']:.1f} images/s per core (two 224 px crops each)"
    elif name == "nccl":
        text = (f"{r['backend']}, 1 process: 2 epochs exit {r['two_epochs_exit']}; SIGTERM exit {r['sigterm_exit']} "
                f"(saved: {r['checkpoint_saved']}); resume exit {r['sigterm_resume_exit']}, log.txt "
                f"{r['log_lines_at_stop']} -> {r['log_lines_after_resume']} lines")
    elif name == "loader":
        text = (f"{r['images']} JPEGs, {r['workers']} workers, pin_memory {r['pin_memory']}, {' '.join(r['flags'])}: "
                f"{r['images_per_s']:.0f} images/s (wall, start-up included), exit {r['exit']}")
    elif name == "faiss":
        text = r["status"] + (f": N={r['n']}, k={r['k']}: {r['kmeans_seconds']:.1f} s" if "n" in r else "")
    elif name == "device_aug":
        text = (f"worker {r['worker_pair_ms']:.1f} ms/pair vs official {r['official_pair_ms']:.1f} ms/pair on one core "
                f"({r['worker_over_official']:.0%}); eval {r['worker_eval_ms']:.1f} vs {r['official_eval_ms']:.1f} "
                f"ms/image; device {r['device_images_per_s']:.0f} images/s ({r['device_size']} px, batch "
                f"{r['device_batch']})")
    elif name == "kmeans_ranks":
        text = f"{r['backend']} ({r['process_group']}, N={r['n']}, nredo {r['nredo']}): " + ", ".join(
            f"k={k} {v:.2f} s" for k, v in r[f"seconds_nredo{r['nredo']}"].items())
        text += (f"; {r['kmeans_tflops']:.2f} TFLOP/s; / torch {r['ranks_over_torch']:.2f}x; assignments = torch: "
                 f"{all(r['assignments_identical'].values())} (deterministic, k={r['deterministic_check']['k']}: "
                 f"{r['deterministic_check']['identical']})")
    else:
        cuda = "" if r["cuda_syncs_per_step"] is None else f", host copies {r['host_copies_per_step']:.2f}"
        text = f"{r['syncs_per_step']:.2f} per step{cuda}; {r['per_epoch']:.0f} per epoch (its end)"
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
