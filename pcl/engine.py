"""Pretraining in one file: :func:`fit` wires the run (settings, process group, data, model, loss, resume) and runs
the loop the paper describes, E-step -> M-step per epoch; :func:`train_one_epoch` is one M-step epoch.

Where things are: the E-step (features, k-means, phi) is :mod:`pcl.estep`; the loss and its terms
:class:`pcl.loss.PCLLoss`; what is observed (cluster statistics, galleries, kNN/NMI) :class:`pcl.monitor.Monitor`;
where a run starts, what it saves and how it stops :class:`pcl.resume.Session`."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from pcl import PCLError, checkpoint as ckpt_io, distributed as dist_utils
from pcl.cluster import ClusterResult
from pcl.config import RunConfig, resolved_settings, validate_pretrain_args
from pcl.data import PretrainData, build_pretrain_data, data_settings
from pcl.estep import e_step, self_check
from pcl.features import FeatureBank
from pcl.log import FiniteGuard, InputClock, RunLog, process_rank, setup_logging, versions, write_run_config
from pcl.loss import PCLLoss
from pcl.model import MoCo, apply_speed_options, build_backbone, channels_last, cpu_compile_problem, unwrap
from pcl.monitor import Monitor
from pcl.preemption import Stopped
from pcl.resume import EpochState, Session
from pcl.schedule import adjust_learning_rate
from pcl.settings import (DistSettings, EStepSettings, ModelSettings, MonitorSettings, OptimSettings,
                          StepSettings)

__all__ = ["fit", "setup", "build_loss", "build_optimizer", "train_one_epoch"]

logger = logging.getLogger("pcl")


def fit(args: Any, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Pretrain with the parsed flags; returns the last epoch's stats (and the kNN report with --knn-eval).

    ``--resume auto`` continues from the furthest readable checkpoint in --exp-dir (none: a fresh start). On
    SIGTERM/SIGUSR1/Ctrl-C the current step finishes, a checkpoint is saved and :class:`pcl.Preempted` is raised.
    Rank 0 holds a lock on --exp-dir for the whole run (a second run there is refused) and first removes the
    temp files of earlier crashed saves. ``on_step(epoch, step)`` is called after every training step.
    """
    cfg = validate_pretrain_args(args)
    hint = dist_utils.spawned_rank(DistSettings.of(cfg))
    setup_logging(cfg.exp_dir, cfg.debug, hint)
    main = process_rank(hint) == 0
    if main:
        logger.info("versions: %s", versions())
    with ckpt_io.ExpDirLock(cfg.exp_dir) if main else contextlib.nullcontext():
        if main:
            ckpt_io.remove_stale_temps(cfg.exp_dir)
        return _pretrain(cfg, on_step)


def _pretrain(cfg: RunConfig, on_step: Callable[[int, int], None] | None) -> dict[str, Any]:
    """The wiring, then the loop: per epoch the E-step (or a mid-epoch checkpoint's prototypes) from warm-up on,
    the lr, one M-step epoch, what the monitor observes, the checkpoint."""
    session = Session.prepare(cfg)
    device, data, model, optimizer = setup(cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    if not session.load(model, optimizer, data, device, scaler):
        return {}
    criterion, estep_settings, optim = build_loss(cfg), EStepSettings.of(cfg), OptimSettings.of(cfg)
    bank, previous = session.bank, session.previous_clusters()  # --estep-features bank; --kmeans-init previous
    options = StepSettings.of(cfg, channels_last(cfg.channels_last, device))
    run_log, stats = _open_logs(cfg, session), {}
    try:
        with session:
            monitor = Monitor(MonitorSettings.of(cfg), run_log, data, device, session.stop, session.path)
            if cfg.warmup_epoch < cfg.epochs:  # the E-step's backend and collectives now, not at --warmup-epoch
                self_check(estep_settings, device, cfg.low_dim)
            for epoch in range(session.start_epoch, cfg.epochs):
                clusters = session.begin(epoch)  # seeds the epoch; mid-epoch: the checkpoint's prototypes
                if clusters is None and epoch >= cfg.warmup_epoch:
                    estep = e_step(model, data.eval_loader, data.num_samples, estep_settings, device, session.stop,
                                   epoch, bank, data.subset_loader, previous)
                    clusters = monitor.e_step(epoch, estep)
                previous = clusters or previous
                lr = adjust_learning_rate(optimizer, epoch, optim.epochs, optim.lr, optim.cos, optim.schedule)
                state = session.epoch_state(epoch, clusters, data.train_loader, criterion.meters)
                stats = train_one_epoch(model, data.train_loader, optimizer, criterion, clusters, state, options,
                                        scaler, on_step, bank)
                stats = monitor.epoch_end(epoch, model, clusters, stats, lr)
                session.save(epoch, clusters)  # before the epoch is logged: a full disk there loses no epoch
                monitor.record(stats)
                session.stop_if_requested(epoch)
            session.stop.after_training = True  # every epoch is saved: a signal now stops nothing
            report = monitor.final_report(model, lambda: build_backbone(cfg.arch, cfg.width, cfg.stem))
            monitor.finished(ckpt_io.checkpoint_path(cfg.exp_dir, cfg.epochs - 1))
            return {**stats, "knn": report} if report else stats
    finally:
        run_log.close()


def _open_logs(cfg: RunConfig, session: Session) -> RunLog:
    """EXP_DIR/config.yaml (rank 0; after ``session.load``: a run refused in another run's folder leaves that run's
    file alone), then the run's log sinks: log.txt, TensorBoard and, with --wandb, the W&B run that the resumed
    checkpoint names (or a new one), whose id the checkpoints then store."""
    resolved = resolved_settings(cfg)
    if dist_utils.is_main():
        write_run_config(cfg.exp_dir, resolved)
    wandb = {"project": cfg.wandb_project, "run_id": session.wandb_id, "config": resolved} if cfg.wandb else None
    run_log = RunLog(cfg.exp_dir, purge_step=session.start_epoch if session.path else None, wandb=wandb)
    session.wandb_id = run_log.wandb_id or session.wandb_id  # without --wandb a resumed run keeps naming it
    return run_log


def _train_step(model: nn.Module, batch: tuple, optimizer: torch.optim.Optimizer, criterion: PCLLoss,
                clusters: ClusterResult | None, state: EpochState, options: StepSettings,
                scaler: torch.amp.GradScaler | None, guard: FiniteGuard, step: int,
                bank: FeatureBank | None = None) -> None:
    """One SGD step on (im_q, im_k, index): the loss, the queue refilled (and with --estep-features bank the
    E-step's bank), the meters updated. No host sync: the loss is checked by ``guard`` on the device and read
    later."""
    moco, device = unwrap(model), state.device
    fmt = torch.channels_last if options.channels_last else torch.contiguous_format
    im_q, im_k, index = batch
    im_q = im_q.to(device, non_blocking=True, memory_format=fmt)
    im_k = im_k.to(device, non_blocking=True, memory_format=fmt)
    index = index.to(device, non_blocking=True)
    with _autocast(options.amp, device):
        q, k = model(im_q, im_k, generator=state.shuffle)
    q, k = q.float(), k.float()  # losses in fp32
    out = criterion(q, k, moco.queue.clone().detach(), index, clusters, state.negatives)
    guard.watch(step, out.total, out.inst, out.proto, optimizer.param_groups[0]["lr"])
    keys = moco.dequeue_and_enqueue(k)  # every rank's keys: B_global x C
    if bank is not None:
        bank.write(keys, index, q)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(out.total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        out.total.backward()
        optimizer.step()
    for name, value in out.logs:
        state.meters.update(name, value, q.shape[0])


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, criterion: PCLLoss,
                    clusters: ClusterResult | None, state: EpochState, options: StepSettings,
                    scaler: torch.amp.GradScaler | None = None,
                    on_step: Callable[[int, int], None] | None = None,
                    bank: FeatureBank | None = None) -> dict[str, float]:
    """One M-step epoch from ``state.start_step``: the loss (InfoNCE, plus ProtoNCE when there are ``clusters``)
    per batch; returns the meters' averages. The meters and the loss check stay on the device and are read every
    --print-freq steps (see :class:`FiniteGuard`). A stop request (``state.stop``, agreed over ranks) raises
    :class:`Stopped` with this rank's loop state after the step it came in. ``bank``: where each step's keys go
    (--estep-features bank)."""
    model.train()
    guard, clock = FiniteGuard(state.device), InputClock()
    last_step = state.start_step + len(loader) - 1
    bar = tqdm(loader, desc=f"epoch {state.epoch}", disable=not dist_utils.is_main() or not options.progress,
               leave=False)
    for step, batch in enumerate(clock.timed(bar), start=state.start_step):
        _train_step(model, batch, optimizer, criterion, clusters, state, options, scaler, guard, step, bank)
        if step % options.print_freq == 0:
            guard.check(state.epoch, step, clusters is not None)
            avg = state.meters.averages()
            bar.set_postfix(loss=f"{avg['loss']:.3f}", acc_inst=f"{avg['acc_inst']:.1f}")
        if on_step is not None:
            on_step(state.epoch, step)
        if step < last_step and state.stop_requested():
            guard.check(state.epoch, step, clusters is not None)  # nothing non-finite is saved
            bar.close()
            raise Stopped(step + 1, state.capture(loader))
    guard.check(state.epoch, last_step, clusters is not None)
    return {**state.meters.averages(), **clock.stats()}


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def build_loss(cfg: RunConfig) -> PCLLoss:
    """The pretraining loss from the flags: InfoNCE at --temperature, ProtoNCE over --num-cluster with --pcl-r
    negatives, and with --pauc the weighted PAUC terms."""
    pauc = {"align": cfg.pauc_align, "uniform": cfg.pauc_uniform, "corr": cfg.pauc_corr} if cfg.pauc else None
    return PCLLoss(cfg.temperature, cfg.num_cluster, cfg.pcl_r, cfg.unique_prototypes, cfg.proto_chunks, pauc,
                   cfg.pauc_alpha, cfg.pauc_t, cfg.proto_weight)


def _check_batch(cfg: RunConfig, world: int) -> int:
    """The per-process batch (--batch-size is the total, as official), after the checks it must pass."""
    if cfg.batch_size % world:
        raise PCLError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    batch = cfg.batch_size // world
    if cfg.pcl_r % cfg.batch_size:
        raise PCLError(f"--pcl-r {cfg.pcl_r} must be a multiple of the global batch {cfg.batch_size} "
                       f"(the queue is refilled a whole batch at a time)")
    if batch % cfg.proto_chunks:
        raise PCLError(f"per-process batch {batch} is not divisible by --proto-chunks {cfg.proto_chunks}")
    return batch


def _check_data(cfg: RunConfig, data: PretrainData) -> None:
    dist_utils.require_same((data.num_samples, data.fingerprint), "the training set (images, sample-list hash)",
                            f"every process must list the same files in {cfg.data} (a stale network-filesystem "
                            f"listing, files still being copied?); wait until they agree, then start again")
    if len(data.train_loader) == 0:  # the last partial batch is dropped, as official: nothing would train
        raise PCLError(f"--batch-size {cfg.batch_size} is larger than the {data.num_samples} training "
                       f"samples: no full batch per epoch; choose at most {data.num_samples}")
    if cfg.warmup_epoch < cfg.epochs and max(cfg.num_cluster) > data.num_samples:
        raise PCLError(f"--num-cluster {','.join(map(str, cfg.num_cluster))}: k={max(cfg.num_cluster)} is "
                       f"larger than the {data.num_samples} training samples; choose every k <= {data.num_samples}")
    if cfg.warmup_epoch < cfg.epochs and cfg.pcl_r >= min(cfg.num_cluster):
        logger.info("--pcl-r %d is more than the smallest granularity (k=%d) can supply: granularities with k <= r "
                    "use all their non-positive prototypes as negatives", cfg.pcl_r, min(cfg.num_cluster))
    _advise_on_size(cfg, data.num_samples)


def _advise_on_size(cfg: RunConfig, n: int) -> None:
    """Settings far from the data, one line of advice each with the values to use: a queue longer than the training
    set (each image is among its own negatives several times over), and k-means asked for fewer than 10 images per
    cluster on average (the official faiss setting's minimum; ImageNet's k = 100k has 12.8)."""
    if cfg.pcl_r > n:
        fit = max(n // cfg.batch_size * cfg.batch_size, cfg.batch_size)
        logger.warning("--pcl-r %d is longer than the %d training images: the queue holds each image %.1f times as a "
                       "negative of itself; use --pcl-r %d (at most N, a multiple of --batch-size %d)", cfg.pcl_r, n,
                       cfg.pcl_r / n, fit, cfg.batch_size)
    if cfg.warmup_epoch < cfg.epochs and max(cfg.num_cluster) * 10 > n:
        top = max(n // 10, 2)
        ks = sorted({max(2, k * top // max(cfg.num_cluster)) for k in cfg.num_cluster})
        logger.warning("--num-cluster %s: k-means gets fewer than 10 of the %d training images per cluster at k=%d; "
                       "use --num-cluster %s (k <= N/10)", ",".join(map(str, cfg.num_cluster)), n,
                       max(cfg.num_cluster), ",".join(map(str, ks)))


def setup(cfg: RunConfig) -> tuple[torch.device, PretrainData, nn.Module, torch.optim.Optimizer]:
    """Process group, data, model and optimiser from the resolved settings (checks that need the data too)."""
    dist = DistSettings.of(cfg)
    device = dist_utils.init(dist)
    unsafe = cfg.compile and cpu_compile_problem(cfg.arch, cfg.width, cfg.stem, device)
    if unsafe:
        raise PCLError(unsafe)
    world = dist_utils.world_size()
    batch = _check_batch(cfg, world)
    m = ModelSettings.of(cfg, world)
    if batch % m.bn_splits:
        raise PCLError(f"per-process batch {batch} is not divisible by --bn-splits {m.bn_splits}")
    torch.manual_seed(cfg.seed)
    data = build_pretrain_data(data_settings(cfg), device=device, knn_wanted=cfg.knn_eval or cfg.knn_every > 0)
    _check_data(cfg, data)
    model = MoCo(m.arch, m.low_dim, m.pcl_r, m.moco_m, m.mlp, m.width, m.stem, m.bn_splits).to(device)
    apply_speed_options(model, cfg.channels_last, cfg.compile)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    moco_only = cfg.warmup_epoch >= cfg.epochs
    if moco_only:
        logger.warning("--warmup-epoch %d is not below --epochs %d: no E-step will run, this is a MoCo-only run "
                       "(for PCL lower it, e.g. --epochs %d --warmup-epoch %d)", cfg.warmup_epoch, cfg.epochs,
                       cfg.epochs, max(cfg.epochs // 2, 1) if cfg.epochs > 1 else 0)
    logger.info("%s: %s (width %d, stem %s) on %s, %d samples, %d processes, global batch %d, %d per %s%s",
                "MoCo only (no E-step)" if moco_only else "PCL", cfg.arch, cfg.width, cfg.stem, device, data.num_samples, world, cfg.batch_size, batch,
                "GPU" if device.type == "cuda" else "process",
                " (-b/--batch-size is the total over all nodes here; the official code's -b is per node)"
                if world > dist_utils.local_processes(dist) else "")
    optim = OptimSettings.of(cfg)
    return device, data, model, build_optimizer(model, optim.lr, optim.momentum, optim.weight_decay, optim.sgd_impl)


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                    impl: str = "auto") -> torch.optim.Optimizer:
    """SGD over ``model.parameters()`` exactly as official (the frozen key encoder's parameters included: they
    never get a gradient, so SGD skips them, and the state's parameter indices match an official checkpoint's
    optimizer, which therefore resumes here and ours there), with the chosen kernel (--sgd-impl)."""
    kernel = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[impl]
    return torch.optim.SGD(model.parameters(), lr, momentum=momentum, weight_decay=weight_decay, **kernel)
