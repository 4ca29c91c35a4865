#!/usr/bin/env python
"""Training-step benchmarks: (a) PCL step vs MoCo step, (b) pretraining throughput under the speed options.

(a) ``--mode overhead``: the same MoCo model, batch and data through ``pcl.engine.train_one_epoch``, once with
    ProtoNCE off (MoCo) and once with a cluster result at the paper's scale (N = 1,281,167 samples,
    k = 25k/50k/100k, r = 16384, random assignments and unit centroids). Rounds are interleaved; the median
    time per step is reported with the overhead of the prototype term.
(b) ``--mode throughput``: images/s of the full pretraining step (query fwd+bwd, key fwd, InfoNCE, SGD) for
    fp32 and the speed options (--amp bf16/fp16, --channels-last, --compile, --sgd-impl fused), same data; the
    ``bn_splits8`` variants use SplitBatchNorm with 8 splits (the single-GPU default) whatever --bn-splits says.
(c) :func:`host_syncs` (no CLI mode; the GPU check's ``syncs`` section): device-to-host syncs per training step.

Synthetic images live in memory (no loader cost). Prints a markdown table, writes JSON to --out.

    python benchmarks/bench_step.py --mode overhead                      # ResNet-18, 32 px, batch 64 (CPU)
    python benchmarks/bench_step.py --mode throughput -a resnet50 --image-size 224 --batch 8 \\
        --variants fp32,bf16,channels_last,bf16+channels_last
"""

import argparse
import collections
import itertools
import os
import statistics
import sys
import time
import warnings
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import hardware, write_json  # noqa: E402
from pcl.cluster import ClusterResult  # noqa: E402
from pcl.config import build_pretrain_parser, parse_args, validate_pretrain_args  # noqa: E402
from pcl.engine import build_loss, build_optimizer, setup, train_one_epoch  # noqa: E402
from pcl.estep import e_step  # noqa: E402
from pcl.model import MoCo, apply_speed_options, channels_last  # noqa: E402
from pcl.preemption import StopRequest  # noqa: E402
from pcl.resume import EpochState  # noqa: E402
from pcl.settings import EStepSettings, StepSettings  # noqa: E402
from pcl.settings import parse_list  # noqa: E402


def synthetic_cluster(n: int, ks: list[int], dim: int, device: torch.device, seed: int = 0) -> ClusterResult:
    gen = torch.Generator().manual_seed(seed)
    im2cluster = [torch.randint(k, (n,), generator=gen) for k in ks]
    centroids = [torch.nn.functional.normalize(torch.randn(k, dim, generator=gen), dim=1) for k in ks]
    concentration = [0.1 + 0.2 * torch.rand(k, generator=gen) for k in ks]
    return ClusterResult(im2cluster, centroids, concentration).to(device)


def batches(opts, device: torch.device, steps: int, n: int) -> list:
    gen = torch.Generator().manual_seed(1)
    shape = (opts.batch, 3, opts.image_size, opts.image_size)
    return [(torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device),
             torch.randint(n, (opts.batch,), generator=gen)) for _ in range(steps)]


def make_args(opts, extra: list[str]) -> argparse.Namespace:
    argv = ["--dataset", "demo", "-a", opts.arch, "--width", str(opts.width), "--stem", opts.stem,
            "--image-size", str(opts.image_size), "-b", str(opts.batch), "--pcl-r", str(opts.r),
            "--num-cluster", opts.ks, "--no-progress", "-p", "1000000", *extra]
    return validate_pretrain_args(parse_args(build_pretrain_parser(), argv))


def one_epoch(model, loader, optimizer, args, device, cluster, epoch: int = 0, start_step: int = 0,
              stop: StopRequest | None = None) -> dict:
    """train_one_epoch with the loss, a fresh loop state and the step options of ``args``."""
    criterion = build_loss(args)
    state = EpochState.start(args.seed, epoch, device, criterion.meters, stop, start_step=start_step)
    return train_one_epoch(model, loader, optimizer, criterion, cluster, state,
                           StepSettings.of(args, channels_last(args.channels_last, device)))


def timed_epoch(model, data, args, device, cluster) -> float:
    optimizer = build_optimizer(model, args.lr, args.momentum, args.weight_decay, args.sgd_impl)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    one_epoch(model, data, optimizer, args, device, cluster)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(data)


class ListLoader(list):
    def set_epoch(self, epoch: int) -> None:
        """The same batches every round: nothing to reshuffle."""


def build_model(args, device, bn_splits):
    torch.manual_seed(0)
    model = MoCo(args.arch, args.low_dim, args.pcl_r, args.moco_m, args.mlp, args.width, args.stem, bn_splits).to(device)
    apply_speed_options(model, args.channels_last, args.compile)
    return model


def overhead(opts, device) -> dict:
    args = make_args(opts, [])
    ks = args.num_cluster
    cluster = synthetic_cluster(opts.n, ks, args.low_dim, device)
    data = ListLoader(batches(opts, device, opts.steps, opts.n))
    warm = ListLoader(data[:2])
    model = build_model(args, device, opts.bn_splits)
    timed_epoch(model, warm, args, device, None)
    timed_epoch(model, warm, args, device, cluster)
    times = {"MoCo": [], "PCL": []}
    for _ in range(opts.rounds):
        times["MoCo"].append(timed_epoch(model, data, args, device, None))
        times["PCL"].append(timed_epoch(model, data, args, device, cluster))
    moco, pcl = statistics.median(times["MoCo"]), statistics.median(times["PCL"])
    return {"mode": "overhead", "moco_step_s": moco, "pcl_step_s": pcl, "overhead_pct": 100 * (pcl / moco - 1),
            "rounds": times, "ks": ks, "r": opts.r, "n": opts.n}


VARIANTS = {"fp32": [], "bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"], "channels_last": ["--channels-last"],
            "bf16+channels_last": ["--amp", "bf16", "--channels-last"],
            "fp16+channels_last": ["--amp", "fp16", "--channels-last"], "fused_sgd": ["--sgd-impl", "fused"],
            "compile": ["--compile"], "bf16+channels_last+compile": ["--amp", "bf16", "--channels-last", "--compile"],
            "bn_splits8": ["--bn-splits", "8"],
            "bf16+channels_last+bn_splits8": ["--amp", "bf16", "--channels-last", "--bn-splits", "8"]}


def throughput(opts, device) -> dict:
    data = ListLoader(batches(opts, device, opts.steps, 1000))
    rows = {}
    models = {}
    for name in parse_list(opts.variants, "--variants", str):
        args = make_args(opts, VARIANTS[name])
        model = build_model(args, device, args.bn_splits or opts.bn_splits)
        if "--channels-last" in VARIANTS[name] and not channels_last(args.channels_last, device):
            print(f"skipping {name}: --channels-last is ignored on the CPU (see pcl.model.apply_speed_options)")
            continue
        timed_epoch(model, ListLoader(data[:2]), args, device, None)  # warm-up (and compilation)
        models[name], rows[name] = (model, args), []
    for _ in range(opts.rounds):  # interleaved rounds
        for name, (model, args) in models.items():
            rows[name].append(opts.batch / timed_epoch(model, data, args, device, None))
    out = {name: statistics.median(v) for name, v in rows.items()}
    return {"mode": "throughput", "images_per_s": out, "rounds": rows,
            "speedup_vs_fp32": {k: v / out["fp32"] for k, v in out.items()} if "fp32" in out else {}}


class HostCopies(TorchFunctionMode):
    """The Tensor methods a step calls that copy a value to the host (on CUDA each is a device-to-host sync)."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self) -> None:
        super().__init__()
        self.watched = {getattr(torch.Tensor, name) for name in self.METHODS}
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.watched:
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def count_syncs(fn, device: torch.device) -> tuple[list[str], int | None]:
    """(host-copy calls seen by :class:`HostCopies`, synchronizing CUDA calls reported by
    ``torch.cuda.set_sync_debug_mode("warn")``: those of C++ code too; None off CUDA) while ``fn()`` runs."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostCopies() as copies:
                fn()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize(device)
    return copies.names, sum("synchroniz" in str(w.message) for w in caught) if cuda else None


def host_syncs(device: torch.device, exp_dir: str, extra: tuple[str, ...] = ()) -> dict:
    """Host syncs per training step of train_one_epoch (demo set, ResNet-18 at width 4, 16 px, batch 64, with an
    E-step result and a StopRequest polled per step, --print-freq out of reach): 2 warm-up steps, then epochs of
    3 and of 6 steps; the difference over 3 steps is per step (what an epoch does once, at its end, cancels)."""
    opts = SimpleNamespace(arch="resnet18", width=4, stem="small", image_size=16, batch=64, r=256, ks="10,20")
    args = make_args(opts, ["--demo-renders", "1", "--kmeans-nredo", "1", "--kmeans-niter", "5", "--workers", "0",
                            "--exp-dir", exp_dir, *(["--cpu"] if device.type == "cpu" else []), *extra])
    _, data, model, optimizer = setup(args)
    cluster = e_step(model, data.eval_loader, data.num_samples, EStepSettings.of(args), device).clusters
    data.train_loader.set_epoch(1)
    steps = [tuple(t.to(device) for t in b) for b in itertools.islice(iter(data.train_loader), 6)]

    def epoch(n: int) -> None:  # from step 1: step 0 is a --print-freq step
        one_epoch(model, ListLoader(steps[:n]), optimizer, args, device, cluster, epoch=1, start_step=1,
                  stop=StopRequest())

    epoch(2)
    three, six = count_syncs(lambda: epoch(3), device), count_syncs(lambda: epoch(6), device)
    python = (len(six[0]) - len(three[0])) / 3
    cuda = None if six[1] is None else (six[1] - three[1]) / 3
    per_step = python if cuda is None else cuda
    return {"syncs_per_step": per_step, "host_copies_per_step": python, "cuda_syncs_per_step": cuda,
            "per_epoch": (six[1] if cuda is not None else len(six[0])) - 6 * per_step,
            "calls_in_6_steps": dict(collections.Counter(six[0])), "flags": list(extra)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["overhead", "throughput"], default="overhead")
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stem", default="small")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bn-splits", type=int, default=8)
    p.add_argument("--r", type=int, default=16384)
    p.add_argument("--ks", default="25000,50000,100000")
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="fp32,bf16,channels_last,bf16+channels_last,fused_sgd")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    hw = hardware(device)
    res = overhead(opts, device) if opts.mode == "overhead" else throughput(opts, device)
    res.update(hardware=hw, torch=torch.__version__, arch=opts.arch, width=opts.width, stem=opts.stem,
               image_size=opts.image_size, batch=opts.batch)
    print(f"\n{opts.mode}: {opts.arch} (width {opts.width}, {opts.stem} stem), {opts.image_size} px, batch {opts.batch}, "
          f"{hw}, torch {torch.__version__}")
    if opts.mode == "overhead":
        print("| step | median s/step | images/s |\n|---|---|---|")
        for name, key in (("MoCo (InfoNCE only)", "moco_step_s"), (f"PCL (+ ProtoNCE, k={opts.ks}, r={opts.r})", "pcl_step_s")):
            print(f"| {name} | {res[key]:.4f} | {opts.batch / res[key]:.1f} |")
        print(f"\nProtoNCE overhead: {res['overhead_pct']:+.1f}% (goal <= 5%)")
    else:
        print("| variant | images/s | vs fp32 |\n|---|---|---|")
        for name, ips in res["images_per_s"].items():
            print(f"| {name} | {ips:.1f} | {res['speedup_vs_fp32'].get(name, float('nan')):.2f}x |")
    out = opts.out or os.path.join(ROOT, "benchmarks", "results", f"step_{opts.mode}_{device.type}_{opts.arch}.json")
    return write_json(res, out)


if __name__ == "__main__":
    main()
