#!/usr/bin/env python
"""The E-step end to end: feature pass + k-means at three granularities + phi (+ broadcast), ours vs original.

Ours: ``pcl.estep.compute_features`` (a MoCo momentum encoder over N synthetic images; skipped with
``--feature-pass none``) and ``pcl.cluster.run_kmeans`` (faiss or the PyTorch backend, the official settings
niter 20 / nredo 5 unless changed). The original approach runs the same faiss k-means, then converts the
assignments with a Python list comprehension and computes phi with per-sample / per-cluster Python loops
(re-implemented in ``bench_estep_math.original_phi``); k-means itself is shared, so it is timed once and
the original's post-processing is added to it. With one process the broadcast is a no-op (it is timed as 0).

Features are N x 128 unit rows drawn around ``--centres`` random centres (clustered, like real embeddings).
Peak memory: the process's max RSS (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).

    python benchmarks/bench_estep.py --n 100000 --ks 1000,2000,4000          # CPU, about 5 minutes
    python benchmarks/bench_estep.py --n 1281167 --ks 25000,50000,100000     # GPU
"""

import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_estep_math import original_phi  # noqa: E402
from common import hardware, write_json  # noqa: E402
from pcl.cluster import estimate_concentration, resolve_backend, run_kmeans  # noqa: E402
from pcl.estep import compute_features  # noqa: E402
from pcl.model import MoCo  # noqa: E402
from pcl.settings import parse_list  # noqa: E402


def synthetic_features(n: int, dim: int, centres: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centres, dim, generator=gen), dim=1)
    x = c[torch.randint(centres, (n,), generator=gen)] + 0.35 * torch.randn(n, dim, generator=gen) / dim ** 0.5
    return F.normalize(x, dim=1)


class SyntheticImages:
    """(images, index) batches of random 32 px images, in order, for the feature pass."""

    def __init__(self, n: int, batch: int, size: int) -> None:
        self.n, self.batch, self.size = n, batch, size

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch

    def __iter__(self):
        gen = torch.Generator().manual_seed(2)
        for s in range(0, self.n, self.batch):
            idx = torch.arange(s, min(s + self.batch, self.n))
            yield torch.randn(len(idx), 3, self.size, self.size, generator=gen), idx


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phi_rows(res: dict, features: torch.Tensor, result, ks: list[int], dim: int, device: torch.device) -> None:
    """phi alone, ours vs original, on the same k-means output (distances recomputed from the centroids)."""
    res["phi_ours_s"], res["post_original_s"], res["phi_max_abs_diff"] = [], [], []
    x = features.float()
    for k, assign in zip(ks, result.im2cluster):
        cent = torch.zeros(k, dim, device=device).index_add_(0, assign, x)
        cent /= torch.bincount(assign, minlength=k).clamp_min(1)[:, None].float()
        dist2 = ((x - cent[assign]) ** 2).sum(1)
        t0 = time.perf_counter()
        ours = estimate_concentration(dist2.sqrt(), assign, k, 0.2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        res["phi_ours_s"].append(time.perf_counter() - t0)
        D, I = dist2.cpu().numpy()[:, None], assign.cpu().numpy()[:, None]
        t0 = time.perf_counter()
        orig = original_phi(D, I, k, 0.2)  # list conversion of the assignments, then the loops
        res["post_original_s"].append(time.perf_counter() - t0)
        res["phi_max_abs_diff"].append(float((orig.double() - ours.cpu().double()).abs().max()))


def print_table(res: dict, opts, ks: list[int]) -> None:
    print(f"\nE-step, N = {opts.n:,} x {opts.dim}, k = {opts.ks}, niter {opts.niter}, nredo {opts.nredo}, {res['hardware']}")
    print("| part | ours | original approach |\n|---|---|---|")
    print(f"| feature pass | {res['feature_pass_s']:.2f} s | same |")
    for k, km, po, pr in zip(ks, res["kmeans_s"], res["phi_ours_s"], res["post_original_s"]):
        print(f"| k = {k}: k-means | {km:.2f} s | same |")
        print(f"| k = {k}: assignments + phi | {po * 1000:.1f} ms | {pr * 1000:.1f} ms |")
    print("| broadcast (one process) | 0 | 0 |")
    print(f"| **E-step total** | **{res['estep_ours_s']:.2f} s** | **{res['estep_original_s']:.2f} s** |")
    print(f"\nphi equal to the original to {max(res['phi_max_abs_diff']):.1e}; peak memory {res['peak_memory_mib']:.0f} MiB "
          f"(the N x d features are {res['features_mib']:.0f} MiB)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--ks", default="1000,2000,4000")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--nredo", type=int, default=5)
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    p.add_argument("--feature-pass", default="demo", choices=["demo", "none"],
                   help="demo: the demo's MoCo (ResNet-18 width 8, small stem) over N synthetic 32 px images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    ks = parse_list(opts.ks, "--ks")
    res = {"n": opts.n, "ks": ks, "niter": opts.niter, "nredo": opts.nredo, "device": str(device)}

    start = time.perf_counter()
    if opts.feature_pass == "demo":
        model = MoCo("resnet18", opts.dim, 1024, 0.99, True, 8, "small", 8).to(device)
        compute_features(model, SyntheticImages(opts.n, 640, 32), device, opts.n, progress=False)
    res["feature_pass_s"] = time.perf_counter() - start
    features = synthetic_features(opts.n, opts.dim, opts.centres).to(device)  # the pass's output replaced by
    # clustered rows so that k-means sees realistic structure (the random network's features are not)

    resolve_backend(opts.backend, device)  # import faiss outside the timing (the original imports it at start-up too)
    start = time.perf_counter()
    result = run_kmeans(features, ks, 0.2, seed=0, niter=opts.niter, nredo=opts.nredo, backend=opts.backend)
    res["kmeans_plus_phi_s"] = time.perf_counter() - start
    res["kmeans_s"] = result.kmeans_seconds
    res["estep_ours_s"] = res["feature_pass_s"] + res["kmeans_plus_phi_s"]

    phi_rows(res, features, result, ks, opts.dim, device)
    res["estep_original_s"] = res["feature_pass_s"] + sum(res["kmeans_s"]) + sum(res["post_original_s"])
    res["peak_memory_mib"] = peak_memory_mib(device)
    res["features_mib"] = opts.n * opts.dim * 4 / 2**20
    res.update(hardware=hardware(device), torch=torch.__version__)

    print_table(res, opts, ks)
    out = opts.out or os.path.join(ROOT, "benchmarks", "results", f"estep_{device.type}_n{opts.n}.json")
    return write_json(res, out)


if __name__ == "__main__":
    main()
