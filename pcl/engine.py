"""Pretraining: the wiring (fit: settings, process group, data, model, resume) and the epoch loop, with one M-step
epoch (train_one_epoch: InfoNCE + ProtoNCE). The E-step (features, k-means, phi) is :mod:`pcl.estep`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pcl import PCLError, checkpoint as ckpt_io, distributed as dist_utils
from pcl.cluster import ClusterResult
from pcl.config import RunConfig, validate_pretrain_args
from pcl.data import PretrainData, build_pretrain_data, stream_seed
from pcl.estep import compute_features, e_step, self_check
from pcl.monitor import knn_report, log_clusters, log_galleries, monitor_scores
from pcl.log import FiniteGuard, RunLog, StepMeters, process_rank, setup_logging
from pcl.loss import info_nce_logits, pauc_terms, proto_nce, top1_percent
from pcl.model import MoCo, apply_speed_options, build_backbone, channels_last, check_weights
from pcl.preemption import StopRequest, clear_marker, raise_preempted
from pcl.schedule import adjust_learning_rate

__all__ = ["fit", "setup", "train_one_epoch", "e_step", "compute_features", "build_optimizer",
           "apply_speed_options", "channels_last", "StopRequest"]

logger = logging.getLogger("pcl")


def _seed(cfg: RunConfig, epoch: int, stream: int) -> int:
    """A distinct seed for each (run seed, epoch, rank, stream): resuming at an epoch replays it exactly."""
    return stream_seed(cfg.seed, epoch, dist_utils.rank(), stream)


def _autocast(cfg: RunConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _proto_terms(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, cluster: ClusterResult, cfg: RunConfig,
                 negative_gen: torch.Generator, meters: StepMeters) -> list[torch.Tensor]:
    """ProtoNCE, then the optional weighted PAUC terms, of one batch (each added to the loss in turn); meters
    updated on the device."""
    b = q.shape[0]
    loss_proto, proto_out, proto_labels, proto_ids = proto_nce(
        q, index, cluster.im2cluster, cluster.centroids, cluster.concentration, cfg.pcl_r, negative_gen,
        return_ids=True, unique_prototypes=cfg.get("unique_prototypes", False), chunks=cfg.get("proto_chunks", 1))
    terms_out = [loss_proto]
    meters.update("loss_proto", loss_proto, b)
    if cfg.get("pauc", False):
        terms = pauc_terms(q, k.detach(), index, cluster.im2cluster, cluster.centroids, cluster.concentration,
                           proto_out, proto_ids, cfg.pauc_alpha, cfg.pauc_t)
        for name, weight in (("align", cfg.pauc_align), ("uniform", cfg.pauc_uniform), ("corr", cfg.pauc_corr)):
            if weight:
                terms_out.append(weight * terms[name])
            meters.update(f"loss_{name}", terms[name], b)
    for k_, out, tgt in zip(cfg.num_cluster, proto_out, proto_labels):
        acc = top1_percent(out, tgt)
        meters.update("acc_proto", acc, b)  # averaged over granularities, as official
        meters.update(f"acc_proto_k{k_}", acc, b)
    return terms_out


def _train_step(model: nn.Module, batch: tuple, optimizer: torch.optim.Optimizer, cfg: RunConfig,
                device: torch.device, cluster: ClusterResult | None, gens: tuple[torch.Generator, torch.Generator],
                meters: StepMeters, scaler: torch.amp.GradScaler | None, guard: FiniteGuard, step: int) -> None:
    """One SGD step on (im_q, im_k, index): InfoNCE + ProtoNCE, the queue refilled, meters updated. No host sync:
    the loss is checked by ``guard`` on the device and read later."""
    moco = model.module if hasattr(model, "module") else model
    fmt = torch.channels_last if channels_last(cfg, device) else torch.contiguous_format
    im_q, im_k, index = batch
    im_q = im_q.to(device, non_blocking=True, memory_format=fmt)
    im_k = im_k.to(device, non_blocking=True, memory_format=fmt)
    index = index.to(device, non_blocking=True)
    with _autocast(cfg, device):
        q, k = model(im_q, im_k, generator=gens[0])
    q, k = q.float(), k.float()  # losses in fp32
    logits, labels = info_nce_logits(q, k, moco.queue.clone().detach(), cfg.temperature)
    loss_inst = F.cross_entropy(logits, labels)
    loss, loss_proto = loss_inst, None
    if cluster is not None:
        terms = _proto_terms(q, k, index, cluster, cfg, gens[1], meters)
        loss_proto = terms[0]
        for term in terms:
            loss = loss + term
    guard.watch(step, loss, loss_inst, loss_proto, optimizer.param_groups[0]["lr"])
    moco.dequeue_and_enqueue(k)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    b = q.shape[0]
    meters.update("loss", loss, b)
    meters.update("loss_inst", loss_inst, b)
    meters.update("acc_inst", top1_percent(logits, labels), b)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epoch: int,
                    cfg: RunConfig, device: torch.device, cluster: ClusterResult | None,
                    scaler: torch.amp.GradScaler | None = None, start_step: int = 0,
                    resume_state: dict[str, Any] | None = None, stop: StopRequest | None = None,
                    on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One M-step epoch. Loss = InfoNCE + mean over granularities of the prototype cross-entropy.

    ``start_step``/``resume_state`` continue an epoch interrupted by :class:`StopRequest`; when a stop is
    requested the returned dict holds ``interrupted_step`` and the ``resume_state`` (RNG streams, loader
    position, running meters) instead of finishing the epoch. The meters and the loss check stay on the device
    and are read every --print-freq steps (see :class:`FiniteGuard`).
    """
    cfg = RunConfig.of(cfg)
    model.train()
    shuffle_gen = torch.Generator(device=device).manual_seed(_seed(cfg, epoch, 1))
    negative_gen = torch.Generator(device=device).manual_seed(_seed(cfg, epoch, 2))
    meters = StepMeters(device, ("loss", "loss_inst", "loss_proto", "acc_inst", "acc_proto"))
    guard = FiniteGuard(device)
    if resume_state is not None:
        shuffle_gen.set_state(resume_state["shuffle_gen"])
        negative_gen.set_state(resume_state["negative_gen"])
        meters.load(resume_state["meters"])
    last_step = start_step + len(loader) - 1
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not dist_utils.is_main() or cfg.no_progress, leave=False)
    for step, batch in enumerate(bar, start=start_step):
        _train_step(model, batch, optimizer, cfg, device, cluster, (shuffle_gen, negative_gen), meters, scaler,
                    guard, step)
        if step % cfg.print_freq == 0:
            guard.check(epoch, step, cluster is not None)
            avg = meters.averages()
            bar.set_postfix(loss=f"{avg['loss']:.3f}", acc_inst=f"{avg['acc_inst']:.1f}")
        if on_step is not None:
            on_step(epoch, step)
        if stop is not None and step < last_step and stop.poll(device):
            guard.check(epoch, step, cluster is not None)  # nothing non-finite is saved
            bar.close()
            return {"interrupted_step": step + 1, "signal": stop.name,
                    "resume_state": {"shuffle_gen": shuffle_gen.get_state(), "negative_gen": negative_gen.get_state(),
                                     "meters": meters.state(), "loader": loader.state_dict(),
                                     "torch_rng": torch.get_rng_state()}}
    guard.check(epoch, last_step, cluster is not None)
    return meters.averages()


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, cfg: RunConfig,
                      cluster: ClusterResult | None, step: int = 0,
                      resume_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Official keys (epoch = the epoch to resume at, arch, state_dict, optimizer) plus our settings and model
    config, the cluster result of the epoch and, for a mid-epoch (preemption) checkpoint, ``step`` and every
    rank's RNG and loader state. Tensors and plain types only."""
    extra: dict[str, Any] = {"step": step, "args": {**cfg.plain(), "global_batch_size": cfg.batch_size}}
    if cluster is not None:
        extra["cluster_result"] = cluster.state_dict()
    if resume_states is not None:
        extra["resume_states"] = resume_states
    return ckpt_io.checkpoint_state(model, epoch + 1 if step == 0 else epoch, cfg.arch, optimizer,
                                    {"width": cfg.width, "stem": cfg.stem, "low_dim": cfg.low_dim, "mlp": cfg.mlp},
                                    **extra)


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


def _check_mid_epoch_resume(ckpt: dict[str, Any], path: str, cfg: RunConfig, data: PretrainData) -> None:
    """A checkpoint saved mid-epoch continues that epoch's exact batches and cluster assignment: it needs the
    same global batch and the same training set (an epoch-boundary checkpoint resumes with either changed)."""
    if not ckpt.get("step"):
        return
    saved = ckpt.get("args") or {}
    if saved.get("global_batch_size") not in (None, cfg.batch_size):
        raise PCLError(f"--resume {path} was saved mid-epoch with --batch-size {saved['global_batch_size']}; resume "
                       f"it with that batch size (now {cfg.batch_size})")
    assign = (ckpt.get("cluster_result") or {}).get("im2cluster") or []
    if assign and len(assign[0]) != data.num_samples:
        raise PCLError(f"--resume {path} was saved mid-epoch on a training set of {len(assign[0])} images, this one "
                       f"has {data.num_samples}: resume it on the same data")


def _check_batch(cfg: RunConfig, world: int) -> int:
    """The per-process batch (--batch-size is the total, as official), after the checks it must pass."""
    if cfg.batch_size % world:
        raise PCLError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    batch = cfg.batch_size // world
    if cfg.pcl_r % cfg.batch_size:
        raise PCLError(f"--pcl-r {cfg.pcl_r} must be a multiple of the global batch {cfg.batch_size} "
                       f"(the queue is refilled a whole batch at a time)")
    if batch % cfg.get("proto_chunks", 1):
        raise PCLError(f"per-process batch {batch} is not divisible by --proto-chunks {cfg.proto_chunks}")
    return batch


def _check_data(cfg: RunConfig, data: PretrainData) -> None:
    if len(data.train_loader) == 0:  # the last partial batch is dropped, as official: nothing would train
        raise PCLError(f"--batch-size {cfg.batch_size} is larger than the {data.num_samples} training "
                       f"samples: no full batch per epoch; choose at most {data.num_samples}")
    if cfg.warmup_epoch < cfg.epochs and max(cfg.num_cluster) > data.num_samples:
        raise PCLError(f"--num-cluster {','.join(map(str, cfg.num_cluster))}: k={max(cfg.num_cluster)} is "
                       f"larger than the {data.num_samples} training samples; choose every k <= {data.num_samples}")
    if cfg.warmup_epoch < cfg.epochs and cfg.pcl_r >= min(cfg.num_cluster):
        logger.warning("--pcl-r %d is larger than what the smallest granularity (k=%d) can supply: granularities "
                       "with k <= r use all their non-positive prototypes as negatives", cfg.pcl_r, min(cfg.num_cluster))


def setup(cfg: RunConfig) -> tuple[torch.device, PretrainData, nn.Module, torch.optim.Optimizer]:
    """Process group, data, model and optimiser from the resolved settings (checks that need the data too)."""
    device = dist_utils.init(cfg)
    world = dist_utils.world_size()
    batch = _check_batch(cfg, world)
    bn_splits = cfg.bn_splits or (8 if world == 1 else 1)
    if batch % bn_splits:
        raise PCLError(f"per-process batch {batch} is not divisible by --bn-splits {bn_splits}")
    torch.manual_seed(cfg.seed)
    data = build_pretrain_data(cfg)
    _check_data(cfg, data)
    model = MoCo(cfg.arch, cfg.low_dim, cfg.pcl_r, cfg.moco_m, cfg.mlp, cfg.width, cfg.stem, bn_splits).to(device)
    apply_speed_options(model, cfg)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return device, data, model, build_optimizer(model, cfg)


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """SGD over ``model.parameters()`` exactly as official (the frozen key encoder's parameters included: they
    never get a gradient, so SGD skips them, and the state's parameter indices match an official checkpoint's
    optimizer, which therefore resumes here and ours there), with the chosen kernel."""
    impl = getattr(cfg, "sgd_impl", "auto")
    kernel = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[impl]
    return torch.optim.SGD(model.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           **kernel)


def fit(args: Any, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Pretrain with the parsed flags; returns the last epoch's stats (and the kNN report if asked).

    ``--resume auto`` continues from the newest readable checkpoint in --exp-dir (none: a fresh start). On
    SIGTERM/SIGUSR1 the current step finishes, a checkpoint is saved and :class:`pcl.Preempted` is raised.
    Rank 0 holds a lock on --exp-dir for the whole run (a second run there is refused) and first removes the
    temp files of earlier crashed saves.
    """
    cfg = validate_pretrain_args(args)
    hint = dist_utils.spawned_rank(cfg)
    setup_logging(cfg.exp_dir, cfg.debug, hint)
    main = process_rank(hint) == 0
    with ckpt_io.ExpDirLock(cfg.exp_dir) if main else contextlib.nullcontext():
        if main:
            ckpt_io.remove_stale_temps(cfg.exp_dir)
        return _train(cfg, on_step)


class _Run:
    """What the epochs of one run share: settings, device, data, model, optimiser, logs, the stop flag."""

    def __init__(self, cfg: RunConfig, on_step: Callable[[int, int], None] | None) -> None:
        self.cfg, self.on_step = cfg, on_step
        self.device, self.data, self.model, self.optimizer = setup(cfg)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.run_log, self.stop = None, None
        self.resumed_preempt: str | None = None  # the preempt checkpoint this run resumed from, removed once passed

    def save(self, epoch: int, cluster: ClusterResult | None, path: str, step: int = 0,
             states: list[dict[str, Any]] | None = None) -> None:
        """Rank 0 writes the checkpoint, unless the weights diverged (then every rank stops, nothing is saved)."""
        def write() -> None:
            check_weights(self.model, f"epoch {epoch} step {step}")
            ckpt_io.save_checkpoint(_checkpoint_state(self.model, self.optimizer, epoch, self.cfg, cluster, step,
                                                      states), path)
            if step == 0 and self.resumed_preempt not in (None, path) and os.path.exists(self.resumed_preempt):
                os.remove(self.resumed_preempt)  # the stop this run continued from is behind it now
        dist_utils.main_only(write, f"saving {path}")

    def clusters(self, epoch: int, resumed: dict[str, Any], start_step: int) -> tuple[ClusterResult | None, Any]:
        """This epoch's E-step result (and, mid-epoch, the rank's resume state from the checkpoint)."""
        cfg, proto = self.cfg, epoch >= self.cfg.warmup_epoch
        if start_step:  # mid-epoch: this epoch's clusters, RNG streams and loader position come from the file
            states = resumed.get("resume_states") or []
            if len(states) != dist_utils.world_size():
                raise PCLError(f"checkpoint {cfg.resume} was saved mid-epoch by {len(states)} processes; "
                               f"resume it with the same number of processes ({len(states)})")
            state = states[dist_utils.rank()]
            cluster = (ClusterResult.from_state_dict(resumed["cluster_result"]).to(self.device)
                       if "cluster_result" in resumed and proto else None)
            torch.set_rng_state(state["torch_rng"])
            return cluster, state
        torch.manual_seed(_seed(cfg, epoch, 0))  # worker-less PIL augmentation draws from here
        cluster = e_step(self.model, self.data, cfg, self.device, epoch, self.stop) if proto else None
        if proto and cluster is None:  # stopped during the E-step: save the epoch boundary
            path = ckpt_io.preempt_path(cfg.exp_dir)
            self.save(epoch - 1, None, path)
            raise_preempted(cfg.exp_dir, path, epoch, 0, self.stop.name)
        return cluster, None

    def epoch(self, epoch: int, resumed: dict[str, Any], start_step: int) -> dict[str, Any]:
        """E-step (or the checkpoint's clusters), M-step, logs, monitor, checkpoint."""
        cfg, data, start = self.cfg, self.data, time.perf_counter()
        cluster, resume_state = self.clusters(epoch, resumed, start_step)
        lr = adjust_learning_rate(self.optimizer, epoch, cfg.epochs, cfg.lr, cfg.cos, cfg.schedule)
        data.train_loader.set_epoch(epoch)
        if resume_state is not None:
            data.train_loader.load_state_dict(resume_state["loader"])
        stats = train_one_epoch(self.model, data.train_loader, self.optimizer, epoch, cfg, self.device, cluster,
                                self.scaler, start_step, resume_state, self.stop, self.on_step)
        if "interrupted_step" in stats:  # every rank's mid-epoch state in one checkpoint, then stop
            states, path = dist_utils.all_gather_object(stats["resume_state"]), ckpt_io.preempt_path(cfg.exp_dir)
            self.save(epoch, cluster, path, stats["interrupted_step"], states)
            raise_preempted(cfg.exp_dir, path, epoch, stats["interrupted_step"], stats["signal"])
        stats.update(epoch=epoch, lr=lr, seconds=time.perf_counter() - start)
        log_clusters(self.run_log, stats, cluster, cfg, epoch, data.knn[1] if data.knn is not None else None)
        if cluster is not None and cfg.get("prototype_gallery", False):
            dist_utils.main_only(lambda: self.run_log.writer is not None and cluster.gallery
                                 and log_galleries(self.run_log, cluster, data, cfg, epoch), "the prototype galleries")
        last = epoch + 1 == cfg.epochs
        if cfg.knn_every and data.knn is not None and ((epoch + 1) % cfg.knn_every == 0 or last):
            scores = monitor_scores(ckpt_io.query_backbone(self.model), data.knn, self.device, cfg.knn_k, cfg.knn_t,
                                    kmeans_backend=cfg.kmeans_backend, should_stop=lambda: self.stop.poll(self.device),
                                    **self.bank_budget())  # {} when a stop came: saved below, then stopped
            stats.update(scores)
            self.run_log.scalars(epoch, {f"train/{k}": v for k, v in scores.items()})
        stopping = not last and self.stop.requested(self.device)  # a signal during the last step or the monitor
        if (epoch + 1) % cfg.save_freq == 0 or last or stopping:
            self.save(epoch, cluster, ckpt_io.checkpoint_path(cfg.exp_dir, epoch))  # saved before it is logged
        self.run_log.record(stats)
        logger.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch"))
        if stopping:
            raise_preempted(cfg.exp_dir, ckpt_io.checkpoint_path(cfg.exp_dir, epoch), epoch + 1, 0, self.stop.name)
        return stats

    def knn_report(self) -> dict[str, float]:
        """kNN top-1 on the labelled test split: learned backbone, a random-init one, and raw pixels."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the random-init baseline
        encoders = {"learned": ckpt_io.query_backbone(self.model),
                    "random_init": build_backbone(cfg.arch, cfg.width, cfg.stem).to(self.device).eval(),
                    "raw_pixels": None}
        return knn_report(encoders, self.data.knn, self.device, cfg.knn_k, cfg.knn_t, **self.bank_budget())

    def bank_budget(self) -> dict[str, int]:
        """What the kNN monitor may hold on rank 0 (--knn-max-bank-gb) and the raw-pixel baseline's image size."""
        return {"budget_bytes": int(self.cfg.knn_max_bank_gb * 2 ** 30), "image_size": self.cfg.image_size}


def _train(cfg: RunConfig, on_step: Callable[[int, int], None] | None) -> dict[str, Any]:
    """The run itself: setup, resume, then E-step + M-step per epoch (see :func:`fit`)."""
    path, ckpt = None, None
    if cfg.resume:  # cheap input first: a wrong or unreadable file fails before the dataset is scanned
        path, ckpt = ckpt_io.resolve_resume(cfg.resume, cfg.exp_dir, "cpu")
        if ckpt is not None:
            ckpt_io.require_pretrain_checkpoint(ckpt, path)
    run = _Run(cfg, on_step)
    if not cfg.resume and not cfg.get("overwrite", False):
        dist_utils.main_only(lambda: ckpt_io.refuse_other_runs(cfg.exp_dir), "checking --exp-dir")
    world = dist_utils.world_size()
    logger.info("PCL: %s (width %d, stem %s) on %s, %d samples, %d processes, global batch %d, %d per %s%s",
                cfg.arch, cfg.width, cfg.stem, run.device, run.data.num_samples, world, cfg.batch_size,
                dist_utils.per_process(cfg.batch_size), "GPU" if run.device.type == "cuda" else "process",
                " (-b/--batch-size is the total over all nodes here; the official code's -b is per node)"
                if world > dist_utils.local_processes(cfg) else "")
    clear_marker(cfg.exp_dir)  # this run continues the preempted one
    resumed: dict[str, Any] = {}
    start_epoch = cfg.start_epoch
    if path is not None:
        resumed = _resume(path, run.model, run.optimizer, run.device, ckpt)
        if os.path.abspath(path) == os.path.abspath(ckpt_io.preempt_path(cfg.exp_dir)):
            run.resumed_preempt = path
        _check_mid_epoch_resume(resumed, path, cfg, run.data)
        start_epoch = int(resumed["epoch"])
        if start_epoch >= cfg.epochs and not resumed.get("step"):
            logger.warning("nothing to train: %s finished epoch %d of --epochs %d (raise --epochs to go on)",
                           path, start_epoch, cfg.epochs)
            return {}
    run.run_log, run.stop = RunLog(cfg.exp_dir), StopRequest().install()
    stats: dict[str, Any] = {}
    try:
        if cfg.warmup_epoch < cfg.epochs:  # the E-step's backend and collectives now, not at --warmup-epoch
            self_check(cfg, run.device, cfg.low_dim)
        for epoch in range(start_epoch, cfg.epochs):
            stats = run.epoch(epoch, resumed, int(resumed.get("step", 0)) if epoch == start_epoch else 0)
        if cfg.knn_eval and run.data.knn is not None:
            stats["knn"] = run.knn_report()
    finally:
        run.stop.restore()
        run.run_log.close()
    return stats
