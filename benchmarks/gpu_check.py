#!/usr/bin/env python
"""The prepared GPU check: what the paper's run needs from a GPU, measured in two calls of at most 5 minutes.

    scripts/gpu_check.sh --part 1     # the training path: tests, step speed, the fast-path loader, DDP, E-step pass
    scripts/gpu_check.sh --part 2     # the E-step's k-means, the launcher over NCCL, the CPU side of the input
    scripts/gpu_check.sh --smoke      # every section at toy sizes on the CPU (the test suite runs it)

Needs what the sections import: PyTorch (a CUDA build) with torchvision (and Pillow, which torchvision pulls in),
numpy, PyYAML and tqdm (the pcl package), scikit-learn (the built-in demo set's digits, which the tests and the nccl
run train on; it pulls in scipy); tensorboard is optional (the runs log a warning without it); pytest for the
``tests`` section and faiss for the ``faiss`` section, each recorded as untested without it. No network: the data
are synthesised, the models built with ``weights=None``. Runs from the checkout (PYTHONPATH points at the repo;
nothing is installed).

Each section is timed and recorded on its own, and the JSON is written again after every section, so a call cut
off keeps what it measured; a failing section is reported and the next one runs. ``--budget`` seconds (default 280
per part on a GPU) skips the sections that would start after it. The seconds below are projections for one H100
SXM (not measured: nothing has run on a GPU yet); part 1 about 3.5 minutes, part 2 about 4.

Part 1:
1. tests (~75 s): the suite's cuda-marked tests (k-means, sampling, logits, chunked ProtoNCE, a 2-epoch run with an
   E-step, fp32 and bf16 + channels-last, the 8-rank collective audit on CUDA tensors) on this device;
2. throughput (~25 s): the pretraining step (query fwd+bwd, key fwd, InfoNCE, SGD) on synthetic 224 px images in
   memory, ResNet-50 at the per-GPU batch of the 8-GPU run (32), fp32 vs --amp bf16 --channels-last: images/s and
   the ratio (goal >= 2x); also both with --bn-splits 8 (SplitBatchNorm, the single-GPU default);
3. overhead (~20 s): PCL step vs MoCo step at r = 16384 and k = 25k/50k/100k over N = 1.28M (goal <= 5 %);
4. sampling (~5 s): negative-prototype sampling + ProtoNCE logits for one granularity at r = 16384, k = 100k,
   per-GPU batch 32 and 256 (goal < 1 ms);
5. syncs (~10 s): host syncs per training step (torch.cuda.set_sync_debug_mode("warn"); on the CPU the
   host-copying Tensor calls) outside --print-freq steps (goal 0; ok at <= 1 per step);
6. fast_path (~30 s): the real ``--augment device`` training loader, without and with ``--decode device`` (nvJPEG),
   on a generated ImageFolder of 500 x 375 JPEGs holding the odd files of ImageNet's train set (CMYK, PNG named
   .JPEG, grey, progressive, 4:4:4, truncated) with --bad-images skip, one epoch at batch 32 under
   torch.cuda.set_sync_debug_mode("error") (goal: no sync in the loader's threads); which files came back from the
   host decode; then one epoch of the real training step fed by it (ResNet-50, bf16, channels-last): images/s and
   its ``input_wait`` (benchmarks/gpu_check_input.py);
7. ddp (~20 s): the MoCo model wrapped in DistributedDataParallel in a 1-process NCCL group (what engine.setup does
   on several GPUs; no other check wraps it), bf16 + channels-last at batch 32: images/s against the same model
   unwrapped, loss finite;
8. estep (~15 s): the E-step's feature pass (the key encoder in eval mode, channels-last, batches of 160 through
   pcl.features.extract_features, images already on the device): images/s in fp32 (the official path) and under
   bf16 autocast (the pass under --amp bf16).

Part 2:
9. kmeans (~45 s): the E-step's k-means on N = 1,281,167 x 128 at k = 25k/50k/100k, niter 20, nredo 1, with the
   backend ``auto`` picks here (the torch k-means without faiss-gpu: strict fp32, TF32 off), and the peak memory
   per k (goal: all three < 60 s, 2 N k d niter FLOPs at ~30 % of the H100's 67 TFLOP/s fp32 peak);
10. kmeans_ranks (~70 s): ``--kmeans-backend torch-ranks``: ``run_kmeans_across_ranks`` in a 1-process group (nccl;
   gloo on the CPU) on the same features, k one at a time, niter 20, nredo 1: seconds and TFLOP/s per k, its
   assignments against the kmeans section's (the torch backend's, same seeds), the two bit-compared at the
   smallest k under torch.use_deterministic_algorithms; then the peak GPU memory of nredo 5 at the largest k
   (niter 2: the memory does not grow with the iterations) with a ResNet-50 MoCo and its SGD state resident;
11. nccl (~90 s, bounded at 120 s): main_pcl.py in subprocesses through the official launcher
   (--multiprocessing-distributed --nproc 1: a 1-process NCCL group over CUDA tensors; gloo on the CPU) with
   --amp fp16 (GradScaler) and the torch k-means: 2 epochs (exit 0), then --epochs 50 stopped by SIGTERM to the
   launcher after its first epoch (exit 75, a checkpoint saved), then --resume auto --epochs 3 (exit 0, log.txt
   continued to 3 lines);
12. loader (~20 s): main_pcl.py DIR for 1 epoch on a generated JPEG ImageFolder (2 classes of 64 x 48 px), 2 loader
   workers, pinned memory and (GPU) --channels-last: images/s over the wall time, process start included;
13. pil (~5 s): the official PIL augmentation (MoCo v2, 224 px) from synthesised ImageNet-sized JPEGs (500 x 375),
   images/s on one CPU core: how many cores one GPU step needs;
14. device_aug (~10 s): ``--augment device``: (a) the loader worker's CPU per pair (decode + the official
   RandomResizedCrop + flip to uint8, twice) next to the official PIL MoCo v2 pipeline's on one core (goal <= 40 %),
   and the E-step's per-image eval crop likewise; (b) ``TensorAugment(crop=False)`` on a uint8 batch of 256
   at 224 px on the device: images/s;
15. faiss (~10 s): faiss k-means on the GPU (N = 200k x 128, k = 10k, nredo 1) when faiss with GPU support is
   installed, else recorded as untested (not a failure).

Writes one JSON (``--out``; default $OUT/gpu_check.json when $OUT is set, else
benchmarks/results/gpu_check_<device>.json), adding to the sections of an existing file from the same hardware (so
the two parts make one file for benchmarks/cost_model.py), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import signal
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
from gpu_check_estep import (free_port, one_process_group, section_estep, section_kmeans,  # noqa: E402
                             section_kmeans_ranks)
from gpu_check_input import (_median_ms, _write_jpeg, section_device_aug, section_fast_path, section_pil,  # noqa: E402
                             sync)
from pcl.checkpoint import preempt_path  # noqa: E402
from pcl.cluster import kmeans  # noqa: E402
from pcl.loss import prototype_logits, sample_negative_prototypes  # noqa: E402
from pcl.settings import parse_list  # noqa: E402

FULL = dict(arch="resnet50", width=64, stem="standard", image_size=224, batch=32, r=16384,
            ks="25000,50000,100000", n=1_281_167, steps=10, rounds=3, kmeans_n=1_281_167, peak_niter=2,
            pil_images=64, pil_size=(500, 375), cli_timeout=120, nccl_budget=120, loader_per_class=256,
            faiss_n=200_000, faiss_k=10_000, aug_size=224, aug_batch=256, aug_rounds=3, fast_per_class=160,
            fast_size=(500, 375), fast_workers=8, estep_batches=20, budget=280.0)
TOY = dict(arch="resnet18", width=8, stem="small", image_size=32, batch=16, r=256, ks="40,80,160", n=4096, steps=2,
           rounds=1, kmeans_n=4096, peak_niter=2, pil_images=8, pil_size=(500, 375), cli_timeout=240,
           nccl_budget=400, loader_per_class=48, faiss_n=4096, faiss_k=64, aug_size=64, aug_batch=32, aug_rounds=2,
           fast_per_class=16, fast_size=(64, 48), fast_workers=0, estep_batches=2, budget=None)
TINY_CLI = ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "-a", "resnet18", "--width", "4",
            "--stem", "small", "--epochs", "2", "--warmup-epoch", "1", "-b", "64", "--pcl-r", "256",
            "--num-cluster", "10,20", "--kmeans-nredo", "1", "--workers", "0", "--no-progress"]


def section_tests(device: torch.device, sizes: dict, shared: dict) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"summary": "untested: pytest is not installed here", "ok": True}
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


def section_throughput(device: torch.device, sizes: dict, shared: dict) -> dict:
    variants = ("fp32,bf16+channels_last,bn_splits8,bf16+channels_last+bn_splits8" if device.type == "cuda" else
                "fp32,bf16,bn_splits8")  # channels-last: GPU only
    res = throughput(SimpleNamespace(**vars(shared["step_opts"]), variants=variants), device)
    fast = "bf16+channels_last" if device.type == "cuda" else "bf16"
    return {"images_per_s": res["images_per_s"], "speedup": res["speedup_vs_fp32"].get(fast), "batch": sizes["batch"],
            "fast_variant": fast, "goal": ">= 2x", "ok": (res["speedup_vs_fp32"].get(fast) or 0) >= 2.0}


def section_overhead(device: torch.device, sizes: dict, shared: dict) -> dict:
    res = overhead(shared["step_opts"], device)
    return {"moco_step_s": res["moco_step_s"], "pcl_step_s": res["pcl_step_s"], "overhead_pct": res["overhead_pct"],
            "goal": "<= 5 %", "ok": res["overhead_pct"] <= 5.0}


def section_sampling(device: torch.device, sizes: dict, shared: dict) -> dict:
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


def section_nccl(device: torch.device, sizes: dict, shared: dict) -> dict:
    cuda, deadline = device.type == "cuda", time.perf_counter() + sizes["nccl_budget"]
    speed = ["--amp", "fp16", "--kmeans-backend", "torch"] if cuda else ["--amp", "none", "--cpu"]
    out: dict = {"backend": "nccl" if cuda else "gloo", "flags": speed}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, *extra: str, stop_when: str | None = None) -> None:
            launcher = ["--dist-url", f"tcp://127.0.0.1:{free_port()}", "--multiprocessing-distributed",
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


def section_loader(device: torch.device, sizes: dict, shared: dict) -> dict:
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


def section_faiss(device: torch.device, sizes: dict, shared: dict) -> dict:
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


def section_syncs(device: torch.device, sizes: dict, shared: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = host_syncs(device, tmp)
    return {**res, "goal": "0 per step outside --print-freq steps", "ok": res["syncs_per_step"] <= 1}


def section_ddp(device: torch.device, sizes: dict, shared: dict) -> dict:
    """The MoCo model wrapped in DistributedDataParallel in a 1-process group, as engine.setup wraps it on several
    GPUs (device_ids, channels-last parameters in DDP's buckets, shuffle-BN's all-gathers and the gradient
    all-reduce for real), --amp bf16 (--channels-last on CUDA) at the per-GPU batch: images/s against the same
    model unwrapped, interleaved rounds; the loss of the last DDP epoch finite."""
    from bench_step import ListLoader, batches, build_model, make_args, one_epoch, timed_epoch

    cuda, opts = device.type == "cuda", shared["step_opts"]
    args = make_args(opts, ["--amp", "bf16", *(["--channels-last"] if cuda else [])])
    data = ListLoader(batches(opts, device, opts.steps, 1000))
    with one_process_group(device) as group:
        models = {"plain": build_model(args, device, 1),
                  "ddp": torch.nn.parallel.DistributedDataParallel(build_model(args, device, 1),
                                                                    device_ids=[device.index or 0] if cuda else None)}
        for model in models.values():
            timed_epoch(model, ListLoader(data[:2]), args, device, None)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(opts.rounds):
            for name, model in models.items():
                rates[name].append(opts.batch / timed_epoch(model, data, args, device, None))
        optimizer = torch.optim.SGD(models["ddp"].parameters(), 0.03, momentum=0.9)
        loss = one_epoch(models["ddp"], data, optimizer, args, device, None)["loss"]
    ips = {name: max(v) for name, v in rates.items()}
    return {"process_group": group, "images_per_s": ips, "ddp_over_plain": ips["ddp"] / ips["plain"],
            "batch": opts.batch, "flags": ["--amp", "bf16", *(["--channels-last"] if cuda else [])],
            "loss": loss, "ok": loss == loss and abs(loss) < float("inf")}


SECTIONS = {"tests": section_tests, "throughput": section_throughput, "overhead": section_overhead,
            "sampling": section_sampling, "syncs": section_syncs, "fast_path": section_fast_path,
            "ddp": section_ddp, "estep": section_estep, "kmeans": section_kmeans, "kmeans_ranks": section_kmeans_ranks,
            "nccl": section_nccl, "loader": section_loader, "pil": section_pil, "device_aug": section_device_aug,
            "faiss": section_faiss}
PARTS = {"1": ("tests", "throughput", "overhead", "sampling", "syncs", "fast_path", "ddp", "estep"),
         "2": ("kmeans", "kmeans_ranks", "nccl", "loader", "pil", "device_aug", "faiss")}


def _kmeans_text(r: dict) -> str:
    peak = [v for v in r["peak_gpu_gb_nredo1"].values() if v is not None]
    return (f"{r['backend']} (N={r['n']}), nredo 1: " + ", ".join(f"k={k} {v:.1f} s" for k, v in r["seconds_nredo1"].items())
            + f"; {r['total_seconds_nredo1']:.1f} s, {r['kmeans_tflops']:.1f} TFLOP/s" + (f"; peak {max(peak):.1f} GB" if peak else ""))


def _ranks_text(r: dict) -> str:
    peak = r["nredo5"]["peak_gpu_gb"]
    return (f"{r['backend']} ({r['process_group']}, N={r['n']}, nredo 1): " + ", ".join(
        f"k={k} {v:.2f} s" for k, v in r["seconds_nredo1"].items()) + f"; {r['kmeans_tflops']:.2f} TFLOP/s; "
        f"assignments = torch: {all(r['assignments_identical'].values())} (deterministic, k={r['deterministic_check']['k']}:"
        f" {r['deterministic_check']['identical']})" + (f"; nredo 5 at k={r['nredo5']['k']} with a training state "
                                                          f"resident: peak {peak:.1f} GB" if peak is not None else ""))


def _fast_text(r: dict) -> str:
    loaders = "; ".join(f"{name} {r[name]['images_per_s']:.0f} img/s, host-decoded {r[name]['host_decoded'] or 'none'}"
                        for name in ("augment", "decode"))
    return (f"{loaders}; training from the decode loader {r['train']['images_per_s']:.0f} img/s, input wait "
            f"{r['train']['input_wait']:.0%} (batch {r['batch']}, {r['workers']} workers)")


ROWS: dict[str, Callable[[dict], str]] = {
    "tests": lambda r: r["summary"],
    "throughput": lambda r: ", ".join(f"{k} {v:.0f} img/s" for k, v in r["images_per_s"].items())
    + f"; {r['fast_variant']} / fp32 = {r['speedup']:.2f}x (batch {r['batch']})",
    "overhead": lambda r: f"MoCo {r['moco_step_s'] * 1e3:.1f} ms, PCL {r['pcl_step_s'] * 1e3:.1f} ms per step: "
                          f"{r['overhead_pct']:+.1f} %",
    "sampling": lambda r: f"batch 32: {r['ms_per_granularity_b32']:.3f} ms, batch 256: {r['ms_per_granularity_b256']:.3f} ms",
    "syncs": lambda r: f"{r['syncs_per_step']:.2f} per step" + (
        "" if r["cuda_syncs_per_step"] is None else f", host copies {r['host_copies_per_step']:.2f}")
    + f"; {r['per_epoch']:.0f} per epoch (its end)",
    "fast_path": _fast_text,
    "ddp": lambda r: f"{r['process_group']}: DDP {r['images_per_s']['ddp']:.0f} img/s vs plain "
                     f"{r['images_per_s']['plain']:.0f} img/s ({r['ddp_over_plain']:.2f}x), loss {r['loss']:.3f}",
    "estep": lambda r: f"feature pass, batch {r['batch']}: fp32 {r['images_per_s']['fp32']:.0f} img/s, bf16 "
                       f"{r['images_per_s']['bf16']:.0f} img/s; ImageNet on 8: "
                       f"{r['imagenet_estep_seconds_on_8']['fp32']:.0f} s (fp32)",
    "kmeans": _kmeans_text,
    "kmeans_ranks": _ranks_text,
    "nccl": lambda r: f"{r['backend']}, 1 process: 2 epochs exit {r['two_epochs_exit']}; SIGTERM exit "
                      f"{r['sigterm_exit']} (saved: {r['checkpoint_saved']}); resume exit {r['sigterm_resume_exit']}, "
                      f"log.txt {r['log_lines_at_stop']} -> {r['log_lines_after_resume']} lines",
    "loader": lambda r: f"{r['images']} JPEGs, {r['workers']} workers, pin_memory {r['pin_memory']}, "
                        f"{' '.join(r['flags'])}: {r['images_per_s']:.0f} images/s (wall, start-up included), exit {r['exit']}",
    "pil": lambda r: f"{r['images_per_s_per_core']:.1f} images/s per core (two 224 px crops each)",
    "device_aug": lambda r: f"worker {r['worker_pair_ms']:.1f} ms/pair vs official {r['official_pair_ms']:.1f} ms/pair "
                            f"on one core ({r['worker_over_official']:.0%}); eval {r['worker_eval_ms']:.1f} vs "
                            f"{r['official_eval_ms']:.1f} ms/image; device {r['device_images_per_s']:.0f} images/s "
                            f"({r['device_size']} px, batch {r['device_batch']})",
    "faiss": lambda r: r["status"] + (f": N={r['n']}, k={r['k']}: {r['kmeans_seconds']:.1f} s" if "n" in r else ""),
}


def row(name: str, r: dict) -> str:
    if "error" in r or "skipped" in r:
        return f"| {name} | {'ERROR: ' + r['error'] if 'error' in r else 'SKIPPED: ' + r['skipped']} | | {r['seconds']:.0f} |"
    goal = r.get("goal", "")
    return f"| {name} | {ROWS[name](r)} | {goal}{' ok' if r.get('ok') else ' MISSED' if goal else ''} | {r['seconds']:.0f} |"


def _run_section(name: str, device: torch.device, sizes: dict, shared: dict) -> dict:
    start = time.perf_counter()
    try:
        res = SECTIONS[name](device, sizes, shared)
    except Exception as e:  # report and go on: one broken section must not hide the others' numbers
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", "ok": False}
    res["seconds"] = time.perf_counter() - start
    return res


def _start(out: str, device: torch.device, sizes: dict) -> dict:
    """The results so far: an existing JSON of this script from the same hardware (the other part), else empty."""
    results = {"hardware": hardware(device), "torch": torch.__version__, "device": str(device),
               "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}, "sections": {}}
    if os.path.exists(out):
        try:
            with open(out) as f:
                before = json.load(f)
        except (OSError, ValueError):
            return results
        if before.get("hardware") == results["hardware"] and before.get("sizes") == results["sizes"]:
            results["sections"].update(before.get("sections", {}))
    return results


def _save(results: dict, out: str) -> None:
    """The JSON, replaced whole (a temporary file renamed): a kill mid-write leaves the previous one."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every section at toy sizes on the CPU (what CI runs)")
    p.add_argument("--part", choices=sorted(PARTS), default=None, help="one of the two calls (default: both)")
    p.add_argument("--sections", default=None, help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--budget", type=float, default=None, help="seconds after which no section starts (default: "
                   f"{FULL['budget']:g} per part on a GPU, none with --smoke)")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else benchmarks/results/)")
    opts = p.parse_args(argv)
    if not opts.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --smoke for the CPU run at toy sizes")
    device = torch.device("cpu" if opts.smoke else "cuda")
    sizes = TOY if opts.smoke else FULL
    names = (parse_list(opts.sections, "--sections", str) if opts.sections else
             list(PARTS[opts.part]) if opts.part else [n for part in PARTS.values() for n in part])
    budget = opts.budget
    if budget is None and sizes["budget"] is not None:
        budget = sizes["budget"] * (1 if opts.part or opts.sections else len(PARTS))
    out = opts.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else
                       os.path.join(ROOT, "benchmarks", "results", f"gpu_check_{device.type}.json"))
    results, shared, began = _start(out, device, sizes), {"step_opts": _step_opts(sizes, device)}, time.perf_counter()
    for name in names:
        if budget is not None and time.perf_counter() - began > budget:
            if name in results["sections"]:
                continue  # measured by an earlier call: kept
            res = {"skipped": f"--budget {budget:g} s spent", "seconds": 0.0}
        else:
            res = _run_section(name, device, sizes, shared)
        results["sections"][name] = res
        print(f"[gpu_check] {name}: {json.dumps(res)}", flush=True)
        _save(results, out)  # after every section: a call cut off keeps what it measured
    table = ["| check | measured | goal | seconds |", "|---|---|---|---|"]
    table += [row(name, r) for name, r in results["sections"].items()]
    results["table"] = "\n".join(table)
    print(f"\n{results['hardware']}\n\n{results['table']}")
    write_json(results, out)
    return results


if __name__ == "__main__":
    sys.exit(0 if all(r.get("ok", False) or "goal" in r or "skipped" in r for r in main()["sections"].values()) else 1)
