#!/usr/bin/env python
"""Warm vs cold k-means between two E-steps whose features drift a little (--kmeans-init previous vs random).

Features: N unit rows drawn around ``--centres`` random centres (clustered, like real embeddings; the generator of
bench_estep.py); the next E-step's features are the same rows moved by Gaussian noise of ``--drift`` (relative
to a unit row) and renormalised. The previous E-step's centroids come from a cold k-means on the first set (not
timed). Then, on the drifted set, one granularity:

* cold: ``run_kmeans(..., nredo=--nredo)`` from random rows (the official setting: 5 restarts, best kept);
* warm: ``run_kmeans(..., init=[previous centroids])``: one run from the previous centroids.

Printed and written (--json): seconds and objective (mean squared distance to the assigned centroid) of each, and
the NMI (percent) between the two assignments. Time it alone on the cores.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_warm_kmeans.py      # N = 200k, d = 128, k = 5k: ~20 min
    PYTHONPATH=. python benchmarks/bench_warm_kmeans.py --n 20000 --k 500       # a quick look
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_estep import synthetic_features  # noqa: E402
from common import hardware, write_json  # noqa: E402
from pcl.cluster import run_kmeans  # noqa: E402
from pcl.features import nmi  # noqa: E402


def drifted(x: torch.Tensor, drift: float, seed: int = 1) -> torch.Tensor:
    """``x`` (unit rows) moved by isotropic noise of norm ~``drift`` per row, renormalised."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) / x.shape[1] ** 0.5
    return F.normalize(x + drift * noise, dim=1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--centres", type=int, default=1000, help="clusters the synthetic rows are drawn around")
    p.add_argument("--drift", type=float, default=0.1, help="noise norm per unit row between the two E-steps")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--nredo", type=int, default=5, help="the cold start's restarts (official 5)")
    p.add_argument("--backend", default="torch", choices=["torch", "faiss"])
    p.add_argument("--json", default=None)
    opts = p.parse_args(argv)
    before = synthetic_features(opts.n, opts.dim, opts.centres)
    after = drifted(before, opts.drift)
    common = dict(seed=0, niter=opts.niter, backend=opts.backend)
    previous = run_kmeans(before, [opts.k], 0.2, nredo=1, **common).centroids[0]  # the last E-step's prototypes
    out: dict = {"hardware": hardware(), "threads": torch.get_num_threads(), "inputs": vars(opts)}
    for name, kwargs in (("cold", {"nredo": opts.nredo}), ("warm", {"nredo": opts.nredo, "init": [previous]})):
        start = time.perf_counter()
        res = run_kmeans(after, [opts.k], 0.2, **common, **kwargs)
        out[name] = {"seconds": time.perf_counter() - start, "objective": res.objective[0],
                     "assignments": res.im2cluster[0]}
    out["nmi_warm_cold"] = nmi(out["warm"].pop("assignments"), out["cold"].pop("assignments"))
    out["speedup"] = out["cold"]["seconds"] / out["warm"]["seconds"]
    out["objective_ratio"] = out["warm"]["objective"] / out["cold"]["objective"]
    print(f"{hardware()}, {out['threads']} threads; N = {opts.n:,}, d = {opts.dim}, k = {opts.k:,}, drift "
          f"{opts.drift}, {opts.backend} backend, niter {opts.niter}")
    print(f"| start | restarts | seconds | objective |\n|---|---|---|---|")
    print(f"| cold (random rows) | {opts.nredo} | {out['cold']['seconds']:.1f} | {out['cold']['objective']:.5f} |")
    print(f"| warm (previous centroids) | 1 | {out['warm']['seconds']:.1f} | {out['warm']['objective']:.5f} |")
    print(f"warm is {out['speedup']:.2f}x faster, objective x {out['objective_ratio']:.4f}, NMI(warm, cold) "
          f"{out['nmi_warm_cold']:.1f} %")
    if opts.json:
        write_json(out, opts.json)
    return out


if __name__ == "__main__":
    main()
