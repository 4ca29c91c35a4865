"""The GPU check's input-pipeline sections (benchmarks/gpu_check.py runs them): the official PIL pipeline per CPU
core (``pil``), the ``--augment device`` worker and device costs (``device_aug``), and the real fast-path loader
(``fast_path``): ``DeviceAugmentLoader`` with and without ``--decode device`` on a generated ImageFolder holding the
odd files of ImageNet's train set, under ``torch.cuda.set_sync_debug_mode("error")``, then training from it."""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from typing import Callable

import torch


def _median_ms(fn: Callable[[], None], device: torch.device, repeats: int = 50) -> float:
    """Median wall milliseconds of ``fn()``, synchronised, after 5 warm-up calls."""
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def section_pil(device: torch.device, sizes: dict, shared: dict) -> dict:
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


def section_device_aug(device: torch.device, sizes: dict, shared: dict) -> dict:
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


def odd_image_folder(root: str, per_class: int, size: tuple[int, int]) -> dict[str, str]:
    """root/train/<a|b>/: ``per_class`` photo-like JPEGs of ``size`` per class, plus in a/ the odd files of
    ImageNet's train set: a CMYK JPEG, a PNG named .JPEG, a grey JPEG, a progressive one, a 4:4:4 one and a
    truncated one (its header reads, its data ends early). Returns {kind: path} of the odd ones."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in "ab":
        os.makedirs(os.path.join(root, "train", c), exist_ok=True)
        for i in range(per_class):
            _write_jpeg(rng, size, os.path.join(root, "train", c, f"{i}.JPEG"))
    w, h = size
    photo = Image.fromarray(rng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)).resize(size)
    odd = {kind: os.path.join(root, "train", "a", f"odd_{kind}.JPEG")
           for kind in ("cmyk", "png", "grey", "progressive", "444", "truncated")}
    photo.convert("CMYK").save(odd["cmyk"], format="JPEG", quality=90)
    photo.save(odd["png"], format="PNG")
    photo.convert("L").save(odd["grey"], format="JPEG", quality=90)
    photo.save(odd["progressive"], format="JPEG", quality=90, progressive=True)
    photo.save(odd["444"], format="JPEG", quality=90, subsampling=0)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    with open(odd["truncated"], "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return odd


def _drive(loader, device: torch.device) -> dict:
    """One epoch of ``loader`` taken as a training loop takes it (a reduction of each batch queued, never read
    back), under torch.cuda.set_sync_debug_mode("error") on CUDA: any synchronising call of the loader's threads
    raises. On the CPU the training thread's tensor ops inside the loader's next() are counted instead (goal 0).
    Images/s over the batches after the first (the workers start with it)."""
    from torch.overrides import TorchFunctionMode

    class Ops(TorchFunctionMode):  # thread-local: the training thread's calls only
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    cuda, ops, images, batches = device.type == "cuda", Ops(), 0, 1
    loader.set_epoch(0)
    acc = torch.zeros((), device=device)
    sync(device)
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        it = iter(loader)
        first = next(it)
        acc += first[0].float().mean()
        start = time.perf_counter()
        while True:
            if cuda:
                batch = next(it, None)
            else:
                with ops:
                    batch = next(it, None)
            if batch is None:
                break
            acc += batch[0].float().mean() + batch[1].float().mean()
            images, batches = images + batch[0].shape[0], batches + 1
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    seconds = time.perf_counter() - start
    return {"batches": batches, "images_per_s": images / max(seconds, 1e-9),
            "finite": bool(torch.isfinite(acc)), "training_thread_ops": None if cuda else ops.count,
            "host_decoded": sorted(os.path.basename(p) for p in getattr(loader, "host_decoded", []))}


def section_fast_path(device: torch.device, sizes: dict, shared: dict) -> dict:
    """``--augment device`` (``augment``) and with ``--decode device`` (``decode``): the real training loader on a
    generated ImageFolder with the odd files (:func:`odd_image_folder`), ``--bad-images skip``, the per-GPU batch,
    driven for an epoch under the sync-debug mode (:func:`_drive`); then (``train``) one epoch of the real training
    step (``--amp bf16``, ``--channels-last`` on CUDA) fed by the ``decode`` loader: images/s and the share of the
    epoch the step waited for input (``input_wait``: what the monitor's "input pipeline bounds this run" warning
    reads). ``truncated_on_host``: the truncated file came back from the host decode (--bad-images skip replaced
    it), i.e. the device decoder refused it as PIL does."""
    from bench_step import build_model, make_args, one_epoch

    from pcl.config import build_pretrain_parser, parse_args
    from pcl.data import build_pretrain_data, data_settings
    from pcl.engine import build_optimizer

    cuda, out = device.type == "cuda", {}
    with tempfile.TemporaryDirectory() as tmp:
        odd = odd_image_folder(tmp, sizes["fast_per_class"], sizes["fast_size"])
        loaders = {}
        for name, extra in (("augment", []), ("decode", ["--decode", "device"])):
            argv = [tmp, "--dataset", "imagefolder", "--image-size", str(sizes["image_size"]), "-b",
                    str(sizes["batch"]), "--workers", str(sizes["fast_workers"]), "--aug-plus", "--augment", "device",
                    "--bad-images", "skip", "--exp-dir", os.path.join(tmp, "exp"), *extra, *([] if cuda else ["--cpu"])]
            loaders[name] = build_pretrain_data(data_settings(parse_args(build_pretrain_parser(), argv)),
                                                device=device).train_loader
            out[name] = _drive(loaders[name], device)
        opts = shared["step_opts"]
        args = make_args(opts, ["--amp", "bf16", *(["--channels-last"] if cuda else [])])
        model = build_model(args, device, args.bn_splits or 8)  # one process: SplitBatchNorm, as the run
        optimizer = build_optimizer(model, args.lr, args.momentum, args.weight_decay, args.sgd_impl)
        one_epoch(model, loaders["decode"], optimizer, args, device, None)  # warm-up: cudnn picks its kernels
        sync(device)
        start = time.perf_counter()
        stats = one_epoch(model, loaders["decode"], optimizer, args, device, None)
        sync(device)
        seconds = time.perf_counter() - start
    n = len(loaders["decode"]) * sizes["batch"]
    out["train"] = {"images_per_s": n / seconds, "input_wait": stats["input_wait"], "loss": stats["loss"],
                    "flags": ["--amp", "bf16", *(["--channels-last"] if cuda else [])]}
    out["odd_files"] = sorted(os.path.basename(p) for p in odd.values())
    clean = all(r["finite"] and (cuda or r["training_thread_ops"] == 0) for r in (out["augment"], out["decode"]))
    out["truncated_on_host"] = "odd_truncated.JPEG" in out["decode"]["host_decoded"]  # False: the device decoded it
    out.update(batch=sizes["batch"], image_size=sizes["image_size"], workers=sizes["fast_workers"],
               goal="no sync in the loader's threads; finite", ok=clean)
    return out
