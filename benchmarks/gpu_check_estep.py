"""The GPU check's E-step sections (benchmarks/gpu_check.py runs them): the feature pass (``estep``), the k-means
with the backend ``auto`` picks (``kmeans``), and ``--kmeans-backend torch-ranks`` against it with its peak memory
next to a training state (``kmeans_ranks``); and the 1-process group the sections that need one share."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Callable

import torch

from bench_estep import synthetic_features
from gpu_check_input import sync
from pcl.cluster import resolve_backend, run_kmeans, run_kmeans_across_ranks
from pcl.settings import parse_list


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_group(device: torch.device):
    """A 1-process group (nccl on CUDA, gloo on the CPU) for the section's duration, unless one exists."""
    import torch.distributed as dist

    @contextlib.contextmanager
    def group():
        own = not dist.is_initialized()
        if own:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", world_size=1, rank=0,
                                    init_method=f"tcp://127.0.0.1:{free_port()}")
        try:
            yield f"{dist.get_backend()}, world 1"
        finally:
            if own:
                dist.destroy_process_group()
    return group()


KMEANS_TEMPERATURE = 0.2  # --temperature's default: phi's mean (the comparison covers phi's inputs, not its scale)


def section_kmeans(device: torch.device, sizes: dict, shared: dict) -> dict:
    """The E-step's k-means per granularity (seed g, niter 20, nredo 1: nredo 5 takes 5x as long, the runs being
    the same work) with the backend ``auto`` picks, timed synchronised, with the peak memory, features included.
    Its results stay in ``shared`` for kmeans_ranks to compare with."""
    ks, niter = parse_list(sizes["ks"], "ks"), 20
    x = synthetic_features(sizes["kmeans_n"], 128, centres=max(ks) // 4).to(device)
    shared["kmeans_x"] = x
    backend, why = resolve_backend("auto", device)
    out, per_k, peak, results = {"backend": backend, "why": why, "n": x.shape[0], "niter": niter}, [], [], {}
    for g, k in enumerate(ks):
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        results[k] = run_kmeans(x, [k], KMEANS_TEMPERATURE, seed=g, niter=niter, nredo=1, backend=backend)
        sync(device)
        per_k.append(time.perf_counter() - start)
        peak.append(torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None)
    if backend == "torch":
        shared["kmeans_torch"] = results
    flops = sum(2.0 * x.shape[0] * k * 128 * niter for k in ks)
    out.update(seconds_nredo1=dict(zip(map(str, ks), per_k)), peak_gpu_gb_nredo1=dict(zip(map(str, ks), peak)),
               total_seconds_nredo1=sum(per_k), kmeans_tflops=flops / sum(per_k) / 1e12,
               goal="all three, nredo 1: < 60 s", ok=sum(per_k) < 60.0)
    return out


def _resident_training_state(device: torch.device, sizes: dict) -> torch.nn.Module:
    """A MoCo model of the run's size with its gradients and SGD momentum buffers allocated: what a rank holds
    besides the E-step."""
    from pcl.model import MoCo

    model = MoCo(sizes["arch"], 128, sizes["r"], 0.999, True, sizes["width"], sizes["stem"]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), 0.03, momentum=0.9)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # the momentum buffers
    return model


def _peak_with_training_state(device: torch.device, sizes: dict, run: Callable[[], tuple]) -> tuple:
    """(GB a training state takes, ``run()``'s result) with that state resident while ``run`` runs."""
    resident = _resident_training_state(device, sizes)
    held = torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    out = run()
    del resident
    return held, out


def section_kmeans_ranks(device: torch.device, sizes: dict, shared: dict) -> dict:
    """``--kmeans-backend torch-ranks``: run_kmeans_across_ranks in a 1-process group (its all-reduces and the
    final gather really run) on the kmeans section's features, one granularity at a time (seed g, as granularity g
    of one call), niter 20, nredo 1, timed synchronised; its assignments against the torch backend's of the kmeans
    section (run again here when that section did not run the torch backend). On CUDA index_add_'s float atomics
    make two runs of either differ in the last bits (and so a few borderline assignments), so the bit-equality
    of the two paths is checked at the smallest k with torch.use_deterministic_algorithms (what ``ok`` requires).
    Then the peak memory of nredo 5 at the largest k (niter ``peak_niter``) with a training state resident.
    FLOP/s: 2 N k d niter nredo / seconds, as benchmarks/cost_model.py counts the E-step's k-means."""
    import warnings

    ks, niter = parse_list(sizes["ks"], "ks"), 20
    x = shared.get("kmeans_x")
    x = x if x is not None else synthetic_features(sizes["kmeans_n"], 128, centres=max(ks) // 4).to(device)
    n, d, cuda = x.shape[0], x.shape[1], device.type == "cuda"
    index = torch.arange(n, device=device)

    def timed(fn: Callable[[], object]) -> tuple[float, object, float | None]:
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        res = fn()
        sync(device)
        return time.perf_counter() - start, res, torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None

    def ranks(k: int, g: int, nredo: int = 1, iterations: int = niter):
        return run_kmeans_across_ranks(x, index, n, [k], KMEANS_TEMPERATURE, seed=g, niter=iterations, nredo=nredo)

    def single(k: int, g: int):
        return run_kmeans(x, [k], KMEANS_TEMPERATURE, seed=g, niter=niter, nredo=1, backend="torch")

    with one_process_group(device) as group:
        secs, peaks, identical, agree = {}, {}, {}, {}
        reference = shared.get("kmeans_torch") or {}
        for g, k in enumerate(ks):
            secs[str(k)], a, peaks[str(k)] = timed(lambda: ranks(k, g))
            b = reference[k] if k in reference else single(k, g)
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
        held, peak5 = _peak_with_training_state(device, sizes, lambda: timed(
            lambda: ranks(max(ks), 0, nredo=5, iterations=sizes["peak_niter"])))
    flops = {k: 2.0 * n * int(k) * d * niter for k in secs}
    total = sum(secs.values())
    return {"backend": "torch-ranks", "process_group": group, "n": n, "d": d, "niter": niter, "nredo": 1,
            "seconds_nredo1": secs, "total_seconds_nredo1": total,
            "tflops_nredo1": {k: flops[k] / s / 1e12 for k, s in secs.items()},
            "kmeans_tflops": sum(flops.values()) / total / 1e12, "peak_gpu_gb_nredo1": peaks,
            "assignments_identical": identical, "assignments_agree_frac": agree,
            "deterministic_check": {"k": ks[0], "identical": strict},
            "nredo5": {"k": max(ks), "niter": sizes["peak_niter"], "seconds": peak5[0], "peak_gpu_gb": peak5[2],
                       "training_state_gb": held},
            "ok": strict and (cuda or all(identical.values()))}  # the CPU's index_add_ is deterministic


def section_estep(device: torch.device, sizes: dict, shared: dict) -> dict:
    """The E-step's feature pass: the key encoder of a MoCo model of the run's size in eval mode (channels-last on
    CUDA) through pcl.features.extract_features (its per-batch bookkeeping included) on batches of 5 x the per-GPU
    batch already on the device (the loader is not timed), in fp32 (the official path) and under bf16 autocast (the
    pass under --amp bf16): images/s, and the seconds one E-step over ImageNet's 1,281,167 images would take on 8
    GPUs at that rate."""
    from pcl.features import extract_features
    from pcl.model import MoCo

    cuda, b = device.type == "cuda", 5 * sizes["batch"]
    moco = MoCo(sizes["arch"], 128, sizes["r"], 0.999, True, sizes["width"], sizes["stem"]).to(device).eval()
    if cuda:
        moco.to(memory_format=torch.channels_last)  # as --channels-last leaves it
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, sizes["image_size"], sizes["image_size"], generator=gen).to(device)
    loader = [(images, torch.arange(i * b, (i + 1) * b, device=device)) for i in range(sizes["estep_batches"])]
    n, out = b * len(loader), {}
    for name in ("fp32", "bf16"):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            extract_features(moco.encode_key, loader[:1], device, b, normalize=False)  # warm-up
            sync(device)
            start = time.perf_counter()
            feats = extract_features(moco.encode_key, loader, device, n, normalize=False)
            sync(device)
        out[name] = n / (time.perf_counter() - start)
    return {"images_per_s": out, "batch": b, "images": n, "finite": bool(torch.isfinite(feats).all()),
            "imagenet_estep_seconds_on_8": {k: 1_281_167 / 8 / v for k, v in out.items()},
            "ok": bool(torch.isfinite(feats).all())}
