"""The training loop: E-step (features, k-means, phi) then M-step (InfoNCE + ProtoNCE) every epoch."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pcl import PCLError, Preempted, checkpoint as ckpt_io, distributed as dist_utils
from pcl.cluster import ClusterResult, check_features, kmeans, run_kmeans
from pcl.config import validate_pretrain_args
from pcl.data import PretrainData, build_pretrain_data, stream_seed
from pcl.evaluation.knn import extract_features, knn_accuracy
from pcl.gallery import caption, gallery_rows, render_gallery
from pcl.log import AverageMeter, RunLog, process_rank, setup_logging
from pcl.loss import accuracy, info_nce_logits, pauc_terms, proto_nce
from pcl.model import MoCo, build_backbone
from pcl.schedule import adjust_learning_rate

logger = logging.getLogger("pcl")


def _seed(args: argparse.Namespace, epoch: int, stream: int) -> int:
    """A distinct seed for each (run seed, epoch, rank, stream): resuming at an epoch replays it exactly."""
    return stream_seed(args.seed, epoch, dist_utils.rank(), stream)


def _autocast(args: argparse.Namespace, device: torch.device):
    if args.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def compute_features(model: nn.Module, loader, device: torch.device, num_samples: int,
                     progress: bool = True, stop: "StopRequest | None" = None) -> torch.Tensor | None:
    """Momentum-encoder features (eval mode, center crop) of the whole training set: N x C on ``device``,
    each sample computed once by one rank and gathered exactly.

    Memory: with one process every batch is written straight into the N x C result (one copy); with several,
    a rank's own rows plus the gathered buffer and the result (see ``gather_rows_exact``).
    With ``stop``, a stop request (agreed over ranks) is checked after every batch: then None on every rank.
    """
    moco = model.module if hasattr(model, "module") else model
    moco.eval()
    dist_utils.broadcast_buffers(moco.encoder_k)  # rank 0's BN statistics on every rank, as DDP's forward would
    bar = tqdm(loader, desc="features", disable=not progress, leave=False)
    if not dist_utils.is_dist():
        out = None
        for images, index in bar:
            rows = moco.encode_key(images.to(device, non_blocking=True)).float()
            if out is None:
                out = torch.zeros(num_samples, rows.shape[1], device=device)
            out[index.to(device)] = rows
            if stop is not None and stop.requested(device):
                return None
        return out
    rows, idx = [], []
    for images, index in bar:
        rows.append(moco.encode_key(images.to(device, non_blocking=True)).float())
        idx.append(index.to(device))
        if stop is not None and stop.requested(device):
            return None
    return dist_utils.gather_rows_exact(torch.cat(rows), torch.cat(idx), num_samples)


def e_step(model: nn.Module, data: PretrainData, args: argparse.Namespace, device: torch.device,
           epoch: int, stop: "StopRequest | None" = None) -> ClusterResult | None:
    """Features, k-means per granularity and phi on rank 0, broadcast so every rank holds the same result.
    None on every rank when ``stop`` was requested during it (checked per feature batch and, on rank 0,
    between granularities): the caller saves the epoch boundary and stops."""
    start = time.perf_counter()
    features = compute_features(model, data.eval_loader, device, data.num_samples, _progress(args), stop)
    if features is None:
        return None
    feat_seconds = time.perf_counter() - start
    interrupted = torch.zeros(1, device=device)
    if dist_utils.is_main():
        result = run_kmeans(features, args.num_cluster, args.temperature, seed=0, niter=args.kmeans_niter,
                            nredo=args.kmeans_nredo, backend=args.kmeans_backend,
                            should_stop=(lambda: stop.signal_name is not None) if stop is not None else None)
        interrupted += len(result.im2cluster) < len(args.num_cluster)
    if dist_utils.broadcast_(interrupted, 0).item():  # every rank learns whether rank 0 stopped early
        return None
    if not dist_utils.is_main():
        check_features(features, args.num_cluster)
        n, d = features.shape
        result = ClusterResult([torch.empty(n, dtype=torch.long, device=device) for _ in args.num_cluster],
                               [torch.empty(k, d, device=device) for k in args.num_cluster],
                               [torch.empty(k, device=device) for k in args.num_cluster])
    for tensors in (result.im2cluster, result.centroids, result.concentration):
        for t in tensors:
            dist_utils.broadcast_(t, 0)
    result.kmeans_seconds = dist_utils.broadcast_object(result.kmeans_seconds)
    result = result.to(device)
    if getattr(args, "fixed_concentration", False):  # ablation: one temperature for every prototype
        result.concentration = [torch.full_like(phi, args.temperature) for phi in result.concentration]
    if getattr(args, "prototype_gallery", False) and dist_utils.is_main():  # O(N) + the shown clusters' rows
        result.gallery = [gallery_rows(features, a, c, phi, seed=args.seed)
                          for a, c, phi in zip(result.im2cluster, result.centroids, result.concentration)]
    result.estep_seconds = time.perf_counter() - start
    logger.info("E-step epoch %d: features %.1f s, k-means %s s, total %.1f s", epoch, feat_seconds,
                "/".join(f"{s:.1f}" for s in result.kmeans_seconds), result.estep_seconds)
    return result


def _progress(args: argparse.Namespace) -> bool:
    return dist_utils.is_main() and not args.no_progress


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption) set a flag; the training loop finishes its step, saves, and stops.

    ``requested`` is agreed over ranks (a one-element all-reduce), so every rank stops at the same step.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: stopping at the next safe point (after this step, feature batch or "
                       "k-means granularity), then saving", self.signal_name)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, device: torch.device) -> bool:
        if not dist_utils.is_dist():
            return self.signal_name is not None
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(dist_utils.all_reduce_sum(flag).item() > 0)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epoch: int,
                    args: argparse.Namespace, device: torch.device, cluster: ClusterResult | None,
                    scaler: torch.amp.GradScaler | None = None, start_step: int = 0,
                    resume_state: dict[str, Any] | None = None, stop: StopRequest | None = None,
                    on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One M-step epoch. Loss = InfoNCE + mean over granularities of the prototype cross-entropy.

    ``start_step``/``resume_state`` continue an epoch interrupted by :class:`StopRequest`; when a stop is
    requested the returned dict holds ``interrupted_step`` and the ``resume_state`` (RNG streams, loader
    position, running meters) instead of finishing the epoch.
    """
    moco = model.module if hasattr(model, "module") else model
    model.train()
    shuffle_gen = torch.Generator(device=device).manual_seed(_seed(args, epoch, 1))
    negative_gen = torch.Generator(device=device).manual_seed(_seed(args, epoch, 2))
    meters = {name: AverageMeter() for name in ("loss", "loss_inst", "loss_proto", "acc_inst", "acc_proto")}
    if resume_state is not None:
        shuffle_gen.set_state(resume_state["shuffle_gen"])
        negative_gen.set_state(resume_state["negative_gen"])
        for name, (total, count) in resume_state["meters"].items():
            meters.setdefault(name, AverageMeter()).sum, meters[name].count = total, count
    last_step = start_step + len(loader) - 1
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not _progress(args), leave=False)
    memory_format = torch.channels_last if getattr(args, "channels_last", False) else torch.contiguous_format
    for step, (im_q, im_k, index) in enumerate(bar, start=start_step):
        im_q = im_q.to(device, non_blocking=True, memory_format=memory_format)
        im_k = im_k.to(device, non_blocking=True, memory_format=memory_format)
        index = index.to(device, non_blocking=True)
        with _autocast(args, device):
            q, k = model(im_q, im_k, generator=shuffle_gen)
        q, k = q.float(), k.float()  # losses in fp32
        logits, labels = info_nce_logits(q, k, moco.queue.clone().detach(), args.temperature)
        loss_inst = F.cross_entropy(logits, labels)
        loss = loss_inst
        b = q.shape[0]
        if cluster is not None:
            loss_proto, proto_out, proto_labels, proto_ids = proto_nce(
                q, index, cluster.im2cluster, cluster.centroids, cluster.concentration, args.pcl_r, negative_gen,
                return_ids=True, unique_prototypes=getattr(args, "unique_prototypes", False),
                chunks=getattr(args, "proto_chunks", 1))
            loss = loss + loss_proto
            meters["loss_proto"].update(loss_proto.item(), b)
            if getattr(args, "pauc", False):
                terms = pauc_terms(q, k.detach(), index, cluster.im2cluster, cluster.centroids,
                                   cluster.concentration, proto_out, proto_ids, args.pauc_alpha, args.pauc_t)
                for name, weight in (("align", args.pauc_align), ("uniform", args.pauc_uniform),
                                     ("corr", args.pauc_corr)):
                    if weight:
                        loss = loss + weight * terms[name]
                    meters.setdefault(f"loss_{name}", AverageMeter()).update(terms[name].item(), b)
            for k_, out, tgt in zip(args.num_cluster, proto_out, proto_labels):
                acc = accuracy(out, tgt)[0]
                meters["acc_proto"].update(acc, b)  # averaged over granularities, as official
                meters.setdefault(f"acc_proto_k{k_}", AverageMeter()).update(acc, b)
        if not torch.isfinite(loss):
            raise PCLError(f"non-finite loss at epoch {epoch} step {step}: loss_inst={loss_inst.item():.4g}"
                           + (f" loss_proto={loss_proto.item():.4g}" if cluster is not None else "")
                           + f" lr={optimizer.param_groups[0]['lr']:.4g}; lower --lr (last checkpoint kept)")
        moco.dequeue_and_enqueue(k)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        meters["loss"].update(loss.item(), b)
        meters["loss_inst"].update(loss_inst.item(), b)
        meters["acc_inst"].update(accuracy(logits, labels)[0], b)
        if step % args.print_freq == 0:
            bar.set_postfix(loss=f"{meters['loss'].avg:.3f}", acc_inst=f"{meters['acc_inst'].avg:.1f}")
        if on_step is not None:
            on_step(epoch, step)
        if stop is not None and step < last_step and stop.requested(device):
            bar.close()
            return {"interrupted_step": step + 1, "signal": stop.signal_name or "signal on another rank",
                    "resume_state": {"shuffle_gen": shuffle_gen.get_state(), "negative_gen": negative_gen.get_state(),
                                     "meters": {n: [m.sum, m.count] for n, m in meters.items()},
                                     "loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}}
    return {name: m.avg for name, m in meters.items() if m.count}


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, args: argparse.Namespace,
                      cluster: ClusterResult | None, step: int = 0,
                      resume_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Official keys (epoch = the epoch to resume at, arch, state_dict, optimizer) plus our model config, the
    cluster result of the epoch and, for a mid-epoch (preemption) checkpoint, ``step`` and every rank's RNG and
    loader state. Tensors and plain types only."""
    plain = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    state = {"epoch": epoch + 1 if step == 0 else epoch, "step": step, "arch": args.arch,
             "state_dict": ckpt_io.model_state(model), "optimizer": optimizer.state_dict(), "args": plain,
             "model_config": {"width": args.width, "stem": args.stem, "low_dim": args.low_dim, "mlp": args.mlp}}
    if cluster is not None:
        state["cluster_result"] = cluster.state_dict()
    if resume_states is not None:
        state["resume_states"] = resume_states
    return state


def _resume(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
            ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load weights, queue and optimiser; return the checkpoint (epoch, step, cluster_result, resume_states)."""
    ckpt = ckpt if ckpt is not None else ckpt_io.load_checkpoint(path, map_location=device)
    ckpt_io.require_pretrain_checkpoint(ckpt, path)
    ckpt_io.load_model_state(model, ckpt["state_dict"], path)
    if ckpt.get("optimizer"):  # official files written without one hold {}
        ckpt_io.load_optimizer_state(optimizer, model, ckpt["optimizer"], path)
    logger.info("resumed from %s (epoch %d, step %d)", path, ckpt["epoch"], ckpt.get("step", 0))
    return ckpt


def _check_mid_epoch_resume(ckpt: dict[str, Any], path: str, args: argparse.Namespace, data: PretrainData) -> None:
    """A checkpoint saved mid-epoch continues that epoch's exact batches and cluster assignment: it needs the
    same global batch and the same training set (an epoch-boundary checkpoint resumes with either changed)."""
    if not ckpt.get("step"):
        return
    saved = ckpt.get("args") or {}
    if saved.get("global_batch_size") not in (None, args.global_batch_size):
        raise PCLError(f"--resume {path} was saved mid-epoch with --batch-size {saved['global_batch_size']}; resume "
                       f"it with that batch size (now {args.global_batch_size})")
    assign = (ckpt.get("cluster_result") or {}).get("im2cluster") or []
    if assign and len(assign[0]) != data.num_samples:
        raise PCLError(f"--resume {path} was saved mid-epoch on a training set of {len(assign[0])} images, this one "
                       f"has {data.num_samples}: resume it on the same data")


def setup(args: argparse.Namespace) -> tuple[torch.device, PretrainData, nn.Module, torch.optim.Optimizer]:
    """Process group, data, model and optimiser from the parsed flags (checks that need the data too)."""
    device = dist_utils.init(args)
    world = dist_utils.world_size()
    if args.batch_size % world:
        raise PCLError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    args.global_batch_size = args.batch_size
    args.batch_size = args.batch_size // world  # per process, as official
    if args.pcl_r % args.global_batch_size:
        raise PCLError(f"--pcl-r {args.pcl_r} must be a multiple of the global batch {args.global_batch_size} "
                       f"(the queue is refilled a whole batch at a time)")
    if args.batch_size % getattr(args, "proto_chunks", 1):
        raise PCLError(f"per-process batch {args.batch_size} is not divisible by --proto-chunks {args.proto_chunks}")
    bn_splits = args.bn_splits or (8 if world == 1 else 1)
    if args.batch_size % bn_splits:
        raise PCLError(f"per-process batch {args.batch_size} is not divisible by --bn-splits {bn_splits}")
    torch.manual_seed(args.seed)
    data = build_pretrain_data(args)
    if len(data.train_loader) == 0:  # the last partial batch is dropped, as official: nothing would train
        raise PCLError(f"--batch-size {args.global_batch_size} is larger than the {data.num_samples} training "
                       f"samples: no full batch per epoch; choose at most {data.num_samples}")
    if args.warmup_epoch < args.epochs and max(args.num_cluster) > data.num_samples:
        raise PCLError(f"--num-cluster {','.join(map(str, args.num_cluster))}: k={max(args.num_cluster)} is "
                       f"larger than the {data.num_samples} training samples; choose every k <= {data.num_samples}")
    if args.warmup_epoch < args.epochs and args.pcl_r >= min(args.num_cluster):
        logger.warning("--pcl-r %d is larger than what the smallest granularity (k=%d) can supply: granularities "
                       "with k <= r use all their non-positive prototypes as negatives", args.pcl_r, min(args.num_cluster))
    model = MoCo(args.arch, args.low_dim, args.pcl_r, args.moco_m, args.mlp, args.width, args.stem,
                 bn_splits).to(device)
    apply_speed_options(model, args)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, args)
    return device, data, model, optimizer


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD over ``model.parameters()`` exactly as official (the frozen key encoder's parameters included: they
    never get a gradient, so SGD skips them, and the state's parameter indices match an official checkpoint's
    optimizer, which therefore resumes here and ours there), with the chosen kernel."""
    impl = getattr(args, "sgd_impl", "auto")
    kernel = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[impl]
    return torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           **kernel)


def apply_speed_options(model: MoCo, args: argparse.Namespace) -> None:
    """--channels-last and --compile on the encoders (numerics unchanged up to kernel choice).

    --channels-last is ignored on the CPU (with a warning): it is slower there (ResNet-50: 2.0 vs 2.4 images/s
    on our 2-core test machine), and oneDNN's NHWC 1x1 stride-2 weight-gradient kernel hangs, crashes or
    computes wrong gradients when the conv has fewer input channels than its register block (8 on AVX2, 16 on
    AVX-512; uxlfoundation/oneDNN#6035) -- the downsampling convs of narrow ResNets. We saw it hang here.
    """
    if getattr(args, "channels_last", False):
        if next(model.parameters()).device.type == "cpu":
            logger.warning("--channels-last is ignored on the CPU: slower there, and oneDNN's NHWC 1x1 stride-2 "
                           "weight-gradient kernel can hang or give wrong gradients on narrow convs "
                           "(uxlfoundation/oneDNN#6035); it is meant for GPUs")
            args.channels_last = False  # the inputs stay contiguous too (see train_one_epoch)
        else:
            model.to(memory_format=torch.channels_last)
    if getattr(args, "compile", False):  # in place: parameter names (and checkpoints) stay the official ones
        model.encoder_q.compile()
        model.encoder_k.compile()


def fit(args: argparse.Namespace, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Pretrain with the parsed flags; returns the last epoch's stats (and the kNN report if asked).

    ``--resume auto`` continues from the newest readable checkpoint in --exp-dir (none: a fresh start). On
    SIGTERM/SIGUSR1 the current step finishes, a checkpoint is saved and :class:`pcl.Preempted` is raised.
    Rank 0 holds a lock on --exp-dir for the whole run (a second run there is refused) and first removes the
    temp files of earlier crashed saves.
    """
    validate_pretrain_args(args)
    hint = args.rank if args.multiprocessing_distributed else None
    setup_logging(args.exp_dir, args.debug, hint)
    main = process_rank(hint) == 0
    with ckpt_io.ExpDirLock(args.exp_dir) if main else contextlib.nullcontext():
        if main:
            ckpt_io.remove_stale_temps(args.exp_dir)
        return _train(args, on_step)


def _train(args: argparse.Namespace, on_step: Callable[[int, int], None] | None) -> dict[str, Any]:
    """The run itself: setup, resume, then E-step + M-step per epoch (see :func:`fit`)."""
    path, ckpt = None, None
    if args.resume:  # cheap input first: a wrong or unreadable file fails before the dataset is scanned
        path, ckpt = ckpt_io.resolve_resume(args.resume, args.exp_dir, "cpu")
        if ckpt is not None:
            ckpt_io.require_pretrain_checkpoint(ckpt, path)
    device, data, model, optimizer = setup(args)
    logger.info("PCL: %s (width %d, stem %s) on %s, %d samples, %d processes, batch %d/process",
                args.arch, args.width, args.stem, device, data.num_samples, dist_utils.world_size(), args.batch_size)
    resumed: dict[str, Any] = {}
    marker = os.path.join(args.exp_dir, "PREEMPTED")
    if dist_utils.is_main() and os.path.exists(marker):
        os.remove(marker)  # this run continues the preempted one
    if path is not None:
        resumed = _resume(path, model, optimizer, device, ckpt)
        _check_mid_epoch_resume(resumed, path, args, data)
        args.start_epoch = int(resumed["epoch"])
        if args.start_epoch >= args.epochs and not resumed.get("step"):
            logger.warning("nothing to train: %s finished epoch %d of --epochs %d (raise --epochs to go on)",
                           path, args.start_epoch, args.epochs)
            return {}
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    run_log = RunLog(args.exp_dir)
    stop = StopRequest().install()
    stats: dict[str, Any] = {}
    try:
        for epoch in range(args.start_epoch, args.epochs):
            start = time.perf_counter()
            start_step = int(resumed.get("step", 0)) if epoch == args.start_epoch else 0
            resume_state = None
            if start_step:  # mid-epoch: this epoch's clusters, RNG streams and loader position come from the file
                states = resumed.get("resume_states") or []
                resume_state = states[dist_utils.rank()] if len(states) == dist_utils.world_size() else None
                if resume_state is None:
                    raise PCLError(f"checkpoint {args.resume} was saved mid-epoch by {len(states)} processes; "
                                   f"resume it with the same number of processes ({len(states)})")
                cluster = (ClusterResult.from_state_dict(resumed["cluster_result"]).to(device)
                           if "cluster_result" in resumed and epoch >= args.warmup_epoch else None)
                torch.set_rng_state(resume_state["torch_rng"])
            else:
                torch.manual_seed(_seed(args, epoch, 0))  # worker-less PIL augmentation draws from here
                cluster = e_step(model, data, args, device, epoch, stop) if epoch >= args.warmup_epoch else None
                if epoch >= args.warmup_epoch and cluster is None:  # stopped during the E-step: save the boundary
                    path = ckpt_io.preempt_path(args.exp_dir)
                    if dist_utils.is_main():
                        ckpt_io.save_checkpoint(_checkpoint_state(model, optimizer, epoch - 1, args, None), path)
                    _raise_preempted(args, path, epoch, 0, stop.signal_name or "signal on another rank")
            lr = adjust_learning_rate(optimizer, epoch, args.epochs, args.lr, args.cos, args.schedule)
            data.train_loader.set_epoch(epoch)
            if resume_state is not None:
                data.train_loader.load_state_dict(resume_state["loader"])
            stats = train_one_epoch(model, data.train_loader, optimizer, epoch, args, device, cluster, scaler,
                                    start_step, resume_state, stop, on_step)
            if "interrupted_step" in stats:
                _save_preempted(model, optimizer, epoch, args, cluster, stats)
            stats.update(epoch=epoch, lr=lr, seconds=time.perf_counter() - start)
            _log_epoch(run_log, stats, cluster, args, epoch, data.knn[1] if data.knn is not None else None)
            if cluster is not None and cluster.gallery and run_log.writer is not None:
                _log_galleries(run_log, cluster, data, args, epoch)
            last = epoch + 1 == args.epochs
            if args.knn_every and data.knn is not None and ((epoch + 1) % args.knn_every == 0 or last):
                scores = monitor_scores(ckpt_io.query_backbone(model), data, args, device)
                stats.update(scores)
                run_log.scalars(epoch, {f"train/{k}": v for k, v in scores.items()})
            run_log.record(stats)
            logger.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch"))
            stopping = not last and stop.requested(device)  # a signal during the epoch's last step
            if dist_utils.is_main() and ((epoch + 1) % args.save_freq == 0 or last or stopping):
                ckpt_io.save_checkpoint(_checkpoint_state(model, optimizer, epoch, args, cluster),
                                        ckpt_io.checkpoint_path(args.exp_dir, epoch))
            if stopping:
                _raise_preempted(args, ckpt_io.checkpoint_path(args.exp_dir, epoch), epoch + 1, 0,
                                 stop.signal_name or "signal on another rank")
        if args.knn_eval and data.knn is not None:
            stats["knn"] = knn_report(model, data, args, device)
    finally:
        stop.restore()
        run_log.close()
    return stats


def _save_preempted(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, args: argparse.Namespace,
                    cluster: ClusterResult | None, stats: dict[str, Any]) -> None:
    """Save every rank's mid-epoch state in one checkpoint (rank 0 writes it), then raise Preempted."""
    step = stats["interrupted_step"]
    states = dist_utils.all_gather_object(stats["resume_state"])
    path = ckpt_io.preempt_path(args.exp_dir)
    if dist_utils.is_main():
        ckpt_io.save_checkpoint(_checkpoint_state(model, optimizer, epoch, args, cluster, step, states), path)
    _raise_preempted(args, path, epoch, step, stats["signal"])


def _raise_preempted(args: argparse.Namespace, path: str, epoch: int, step: int, signal_name: str) -> None:
    """All ranks stop together; rank 0 leaves EXP_DIR/PREEMPTED for the launch scripts (they requeue)."""
    err = Preempted(path, epoch, step, signal_name)
    if dist_utils.is_main():
        with open(os.path.join(args.exp_dir, "PREEMPTED"), "w") as f:
            f.write(str(err) + "\n")
    dist_utils.barrier()
    raise err


def _log_epoch(run_log: RunLog, stats: dict[str, Any], cluster: ClusterResult | None, args: argparse.Namespace,
               epoch: int, labels: torch.Tensor | None = None) -> None:
    """E-step timings and cluster statistics into the stats (NMI/AMI per granularity against the training
    labels when the set has them), and everything to TensorBoard (with cluster-size and phi histograms)."""
    if cluster is not None and labels is not None and dist_utils.is_main():
        from pcl.evaluation.cluster_metrics import clustering_scores

        for k_, assign in zip(args.num_cluster, cluster.im2cluster):
            # rank 0 only, while the others wait: NMI is O(N), AMI is skipped above 200k samples, and the
            # Hungarian accuracy (a dense k x classes table: 0.8 GB at ImageNet's k = 100k) is not computed
            scores = clustering_scores(labels.numpy(), assign.cpu().numpy(), with_acc=False)
            stats.update({f"{m}_k{k_}": v for m, v in scores.items()})
    if cluster is not None:
        stats["estep_seconds"] = cluster.estep_seconds
        for k_, sec in zip(args.num_cluster, cluster.kmeans_seconds):
            stats[f"kmeans_seconds_k{k_}"] = sec
        sizes = [torch.bincount(a, minlength=len(c)).float() for a, c in zip(cluster.im2cluster, cluster.centroids)]
        for k, s, phi in zip(args.num_cluster, sizes, cluster.concentration):
            run_log.scalars(epoch, {f"cluster/k{k}_size_max": s.max().item(),
                                    f"cluster/k{k}_empty": (s == 0).sum().item(),
                                    f"cluster/k{k}_phi_std": phi.std().item()})
            run_log.histogram(f"cluster/k{k}_phi", phi, epoch)
            run_log.histogram(f"cluster/k{k}_sizes", s, epoch)
    run_log.scalars(epoch, {f"train/{k}": v for k, v in stats.items() if k != "epoch"})


def _log_galleries(run_log: RunLog, cluster: ClusterResult, data: PretrainData, args: argparse.Namespace,
                   epoch: int) -> None:
    """One prototype gallery per granularity into TensorBoard (rank 0): ~80 pictures decoded per granularity."""
    start = time.perf_counter()
    for k, rows in zip(args.num_cluster, cluster.gallery):
        run_log.image(f"prototypes/k{k}", render_gallery(rows, data.eval_loader), epoch)
        run_log.text(f"prototypes/k{k}", caption(k, rows), epoch)
    logger.info("prototype galleries: %.2f s", time.perf_counter() - start)



def monitor_scores(encoder: nn.Module | None, data: PretrainData, args: argparse.Namespace, device: torch.device,
                   with_nmi: bool = True) -> dict[str, float]:
    """On the labelled test split: weighted kNN top-1 (percent; training split as the memory bank) and, with
    ``with_nmi``, ``test_nmi``: NMI (percent) of k-means with k = the number of classes on the L2-normalised
    test features (one faiss/torch k-means of a few thousand points: milliseconds)."""
    bank_loader, bank_labels, test_loader, test_labels = data.knn
    if encoder is not None:
        dist_utils.broadcast_buffers(encoder)  # one set of BN statistics for every rank's shard
    bank = extract_features(encoder, bank_loader, device, len(bank_labels))
    test = extract_features(encoder, test_loader, device, len(test_labels))
    scores = {"knn_top1": knn_accuracy(bank, bank_labels, test, test_labels, args.knn_k, args.knn_t)}
    if with_nmi:
        from pcl.evaluation.cluster_metrics import clustering_scores

        num_classes = int(max(bank_labels.max(), test_labels.max())) + 1
        assign = kmeans(test, num_classes, seed=0, niter=20, nredo=1, backend=args.kmeans_backend)[2]
        scores["test_nmi"] = clustering_scores(test_labels.numpy(), assign.cpu().numpy(), with_ami=False)["nmi"]
    return scores


def knn_top1(encoder: nn.Module | None, data: PretrainData, args: argparse.Namespace, device: torch.device) -> float:
    """Weighted kNN top-1 (percent) on the labelled test split, training split as the memory bank."""
    return monitor_scores(encoder, data, args, device, with_nmi=False)["knn_top1"]


def knn_report(model: nn.Module, data: PretrainData, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """kNN top-1 on the labelled test split: learned backbone, a random-init one, and raw pixels."""
    torch.manual_seed(args.seed)
    encoders = {"learned": ckpt_io.query_backbone(model),
                "random_init": build_backbone(args.arch, args.width, args.stem).to(device).eval(),
                "raw_pixels": None}
    report = {name: knn_top1(enc, data, args, device) for name, enc in encoders.items()}
    logger.info("kNN top-1 (k=%d, T=%g) on the test split: %s", args.knn_k, args.knn_t,
                ", ".join(f"{k} {v:.2f}%" for k, v in report.items()))
    if dist_utils.is_main():
        print("\n| features | kNN top-1 |\n|---|---|")
        for name, acc in report.items():
            print(f"| {name} | {acc:.2f}% |")
    return report
