#!/usr/bin/env python
"""The torch k-means backend against faiss on the same data: objective, agreement, empty-cluster splits, time.

Both run the official settings (niter, nredo, max 1000 points per centroid) on the same N x d unit rows, from
different random initialisations (they cannot share faiss's RNG). Reported per (N, k): the k-means objective
(sum of squared distances to the nearest centroid, lower is better) of each, their ratio, the NMI between the
two assignments (how much the two partitions agree; two faiss runs with different seeds give the reference
level), how many clusters the torch backend had to split, and wall times.

Data: ``--data synthetic`` (unit rows drawn around ``--centres`` random centres, as bench_estep.py) or
``--data fmnist`` (L2-normalised raw pixels of Fashion-MNIST's training split, from Debian's package).

    python benchmarks/bench_kmeans.py                         # CPU, ~2 minutes
    python benchmarks/bench_kmeans.py --data fmnist --n 60000 --ks 100,300,1000
    python benchmarks/bench_kmeans.py --precision bf16        # --kmeans-precision bf16 against fp32 (same seed)

With ``--precision tf32|bf16`` it compares the torch k-means at that ``--kmeans-precision`` with the same run in
fp32 instead: objective ratio, NMI between the two assignments, seconds (TF32 differs from fp32 on CUDA only).
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

from bench_estep import synthetic_features  # noqa: E402
from common import hardware, use_cores, write_json  # noqa: E402
import pcl.cluster as cluster  # noqa: E402
from pcl.evaluation.cluster_metrics import clustering_scores  # noqa: E402
from pcl.settings import parse_list  # noqa: E402


def counting_splits():
    """Wrap the torch backend's split function to count the clusters it refills."""
    counter = {"splits": 0}
    original = cluster.split_empty_clusters

    def counted(c, counts, gen):
        n = original(c, counts, gen)
        counter["splits"] += n
        return n

    cluster.split_empty_clusters = counted
    return counter, lambda: setattr(cluster, "split_empty_clusters", original)


def load(opts: argparse.Namespace) -> torch.Tensor:
    if opts.data == "synthetic":
        return synthetic_features(opts.n, opts.dim, opts.centres)
    from pcl.data import load_mnist_family

    images = load_mnist_family("fashion-mnist", opts.fmnist_dir)["train"][: opts.n]
    return F.normalize(images.flatten(1).float(), dim=1)


def objective(x: torch.Tensor, c: torch.Tensor) -> float:
    return float(cluster._nearest(x, c)[0].double().sum())


def precision_rows(x: torch.Tensor, opts: argparse.Namespace) -> list[dict]:
    """The torch k-means at ``opts.precision`` against fp32, the same seed: how much the partition moves."""
    rows = []
    for k in parse_list(opts.ks, "--ks"):
        runs = {}
        for precision in ("fp32", opts.precision):
            start = time.perf_counter()
            c, _, a = cluster.kmeans(x, k, seed=0, niter=opts.niter, nredo=opts.nredo, backend="torch",
                                     precision=precision)
            runs[precision] = (c, a, time.perf_counter() - start)
        (c32, a32, t32), (c_low, a_low, t_low) = runs["fp32"], runs[opts.precision]
        row = {"n": x.shape[0], "k": k, "precision": opts.precision,
               "objective_ratio_low_over_fp32": objective(x, c_low.float()) / objective(x, c32.float()),
               "nmi_low_vs_fp32": clustering_scores(a32.cpu().numpy(), a_low.cpu().numpy(), False, False)["nmi"],
               "same_assignment_share": float((a32 == a_low).float().mean()),
               "fp32_seconds": t32, "low_seconds": t_low}
        rows.append(row)
        print(f"k={k}: objective {opts.precision}/fp32 {row['objective_ratio_low_over_fp32']:.5f}, NMI "
              f"{row['nmi_low_vs_fp32']:.2f}, same assignment {100 * row['same_assignment_share']:.1f} %, "
              f"{t_low:.2f} s vs {t32:.2f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["synthetic", "fmnist"], default="synthetic")
    p.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--centres", type=int, default=200, help="synthetic data: true centres (k above it forces splits)")
    p.add_argument("--ks", default="100,1000,2500")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--nredo", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["tf32", "bf16"], default=None,
                   help="compare the torch k-means at this --kmeans-precision with fp32 instead of torch with faiss")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_kmeans.json"))
    opts = p.parse_args(argv)
    x = load(opts).to(opts.device)
    if opts.precision:
        result = {"hardware": hardware(opts.device), "data": opts.data, "niter": opts.niter, "nredo": opts.nredo,
                  "rows": precision_rows(x, opts)}
        return write_json(result, opts.out.replace(".json", f"_{opts.precision}.json"))
    rows = []
    for k in parse_list(opts.ks, "--ks"):
        start = time.perf_counter()
        c_f, _, a_f = cluster.kmeans(x, k, seed=0, niter=opts.niter, nredo=opts.nredo, backend="faiss")
        t_f = time.perf_counter() - start
        c_f2, _, a_f2 = cluster.kmeans(x, k, seed=1, niter=opts.niter, nredo=opts.nredo, backend="faiss")
        counter, restore = counting_splits()
        try:
            start = time.perf_counter()
            c_t, _, a_t = cluster.kmeans(x, k, seed=0, niter=opts.niter, nredo=opts.nredo, backend="torch")
            t_t = time.perf_counter() - start
        finally:
            restore()
        obj_f, obj_t = objective(x, c_f.float()), objective(x, c_t.float())
        row = {"n": x.shape[0], "k": k, "faiss_objective": obj_f, "torch_objective": obj_t,
               "objective_ratio_torch_over_faiss": obj_t / obj_f,
               "objective_ratio_faiss_seed1_over_seed0": objective(x, c_f2.float()) / obj_f,
               "nmi_torch_vs_faiss": clustering_scores(a_f.cpu().numpy(), a_t.cpu().numpy(), False, False)["nmi"],
               "nmi_faiss_seed0_vs_seed1": clustering_scores(a_f.cpu().numpy(), a_f2.cpu().numpy(), False, False)["nmi"],
               "torch_empty_clusters_split": counter["splits"],
               "torch_final_empty": int((torch.bincount(a_t, minlength=k) == 0).sum()),
               "faiss_final_empty": int((torch.bincount(a_f, minlength=k) == 0).sum()),
               "faiss_seconds": t_f, "torch_seconds": t_t}
        rows.append(row)
        print(f"k={k}: objective torch/faiss {row['objective_ratio_torch_over_faiss']:.4f}, NMI torch-faiss "
              f"{row['nmi_torch_vs_faiss']:.1f} (faiss seed 0 vs 1: {row['nmi_faiss_seed0_vs_seed1']:.1f}), "
              f"splits {counter['splits']}, {t_t:.1f} s vs {t_f:.1f} s", flush=True)
    result = {"hardware": hardware(opts.device), "data": opts.data, "niter": opts.niter, "nredo": opts.nredo,
              "centres": opts.centres if opts.data == "synthetic" else None, "rows": rows}
    print("\n| k | objective torch / faiss | faiss seed 1 / seed 0 | NMI torch vs faiss | NMI faiss vs faiss (other seed) | torch splits | "
          "empty at end torch / faiss | seconds torch / faiss |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['objective_ratio_torch_over_faiss']:.4f} | "
              f"{r['objective_ratio_faiss_seed1_over_seed0']:.4f} | {r['nmi_torch_vs_faiss']:.1f} | "
              f"{r['nmi_faiss_seed0_vs_seed1']:.1f} | {r['torch_empty_clusters_split']} | "
              f"{r['torch_final_empty']} / {r['faiss_final_empty']} | {r['torch_seconds']:.1f} / {r['faiss_seconds']:.1f} |")
    write_json(result, opts.out)
    return result


if __name__ == "__main__":
    use_cores()
    main()
