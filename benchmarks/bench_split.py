#!/usr/bin/env python
"""The torch k-means' empty-cluster split (``pcl.cluster.split_empty_clusters``), batched in rounds, against the
same split one cluster after the other (faiss's loop, two host syncs and ~10 kernels per empty cluster: what the
function did before), on the same inputs, at ImageNet's points per cluster at k = 100k (N / k = 12.8).

Inputs per scenario: k centroids (d dims, unit rows) and cluster sizes summing to N, of which ``empty`` are 0 and
the others are N points spread uniformly at random over the remaining clusters. Scenarios: one empty cluster, 4.4 %
of k (the share the torch k-means left empty at its second Lloyd iteration at N / k = 12.8 on synthetic features)
and 50 % (collapsed features). Reported per scenario: seconds per call of each (the best of ``--repeats``), their
ratio, and the draws (``torch.multinomial`` calls) each made; both start from the same generator state.

    python benchmarks/bench_split.py                                  # N = 128,000, k = 10,000, d = 128, CPU
    python benchmarks/bench_split.py --n 1281167 --k 100000 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import hardware, use_cores, write_json  # noqa: E402
from pcl.cluster import SPLIT_EPS, split_empty_clusters  # noqa: E402


@torch.no_grad()
def sequential_split(c: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
    """One empty cluster after the other: a donor drawn by size - 1 from the sizes the previous splits left."""
    empty = (counts == 0).nonzero().flatten().tolist()
    sign = torch.ones(c.shape[1], dtype=c.dtype, device=c.device)
    sign[1::2] = -1
    for ci in empty:
        weight = (counts - 1).clamp_min(0).to(torch.float64)
        if float(weight.sum()) <= 0:
            break
        cj = int(torch.multinomial(weight, 1, generator=gen))
        c[ci] = c[cj] * (1 + SPLIT_EPS * sign)
        c[cj] = c[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


def scenario(n: int, k: int, d: int, empty: int, device: torch.device, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids k x d, sizes k with ``empty`` zeros at random positions, summing to n)."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    holes = torch.randperm(k, generator=g)[:empty]
    full = torch.ones(k, dtype=torch.bool)
    full[holes] = False
    counts = torch.zeros(k, dtype=torch.long)
    counts[full] = torch.bincount(torch.randint(int(full.sum()), (n,), generator=g), minlength=int(full.sum()))
    return c.to(device), counts.to(device)


def timed(fn, c: torch.Tensor, counts: torch.Tensor, device: torch.device, repeats: int) -> tuple[float, int]:
    """(best seconds of ``repeats`` calls on fresh copies, multinomial draws per call)."""
    real, draws, best = torch.multinomial, [0], float("inf")

    def counted(*a, **kw):
        draws[0] += 1
        return real(*a, **kw)

    torch.multinomial = counted
    try:
        for _ in range(repeats):
            cc, nn_, gen = c.clone(), counts.clone(), torch.Generator(device=device).manual_seed(0)
            draws[0] = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn(cc, nn_, gen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
            assert int(nn_.sum()) == int(counts.sum())
    finally:
        torch.multinomial = real
    return best, draws[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128_000)
    p.add_argument("--k", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shares", default="0,0.044,0.5", help="empty clusters as shares of k (0: exactly one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_split.json"))
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    rows = []
    for share in (float(s) for s in opts.shares.split(",")):
        empty = max(1, round(share * opts.k))
        c, counts = scenario(opts.n, opts.k, opts.dim, empty, device)
        before, draws_before = timed(sequential_split, c, counts, device, opts.repeats)
        after, draws_after = timed(split_empty_clusters, c, counts, device, opts.repeats)
        row = {"empty": empty, "sequential_s": before, "batched_s": after, "speedup": before / after,
               "sequential_draws": draws_before, "batched_draws": draws_after}
        rows.append(row)
        print(f"{empty} empty of k={opts.k}: sequential {before * 1e3:.1f} ms ({draws_before} draws), batched "
              f"{after * 1e3:.2f} ms ({draws_after} draws): {before / after:.1f}x", flush=True)
    return write_json({"hardware": hardware(device), "n": opts.n, "k": opts.k, "dim": opts.dim,
                       "points_per_cluster": opts.n / opts.k, "rows": rows}, opts.out)


if __name__ == "__main__":
    use_cores()
    main()
