"""Linear probe on frozen features.

Two modes, both on the shared parser (``pcl.config.build_linear_parser``):

- the official protocol (PCL's ``eval_cls_imagenet.py``): torchvision ResNet with the pretrained query
  backbone frozen and in eval mode (BatchNorm statistics never move), ``fc`` re-initialised N(0, 0.01) with a
  zero bias, SGD lr 5 / momentum 0.9 / wd 0, batch 256, 100 epochs, lr /10 at 60 and 80,
  RandomResizedCrop + flip for training, Resize + CenterCrop for validation, top-1/top-5, best kept, and a
  check after the first epoch that the frozen weights did not change;
- ``--cached-features`` (not the paper's protocol): the frozen features are extracted once (center crops, and
  optionally ``--cached-views`` augmented views per image) and the same head/optimiser/schedule is trained on
  the cached tensor.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pcl import PCLError, checkpoint as ckpt_io, distributed as dist_utils
from pcl.config import RunConfig
from pcl.data import LabelledData, build_labelled_data, data_settings
from pcl.evaluation.common import LossGuard, eval_backbone, follow_checkpoint, prepare_eval, resolve_eval_dataset
from pcl.features import extract_features
from pcl.log import AverageMeter, RunLog
from pcl.model import unwrap
from pcl.schedule import adjust_learning_rate

logger = logging.getLogger("pcl")

LINEAR_LAST = "linear_checkpoint.pth.tar"
LINEAR_BEST = "linear_best.pth.tar"


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------
def build_probe(args: Any, num_classes: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A torchvision ResNet: the pretrained query backbone (frozen) with a fresh ``fc`` (num_classes).

    Returns the model (on the CPU; ``.arch`` names it) and a copy of the frozen weights for :func:`sanity_check`.
    """
    model = eval_backbone(args)
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.fc = nn.Linear(model.feature_dim, num_classes)
    model.fc.weight.data.normal_(mean=0.0, std=0.01)
    model.fc.bias.data.zero_()
    for name, param in model.named_parameters():
        param.requires_grad = name in ("fc.weight", "fc.bias")
    return model.eval(), frozen


def backbone_settings(model: nn.Module) -> dict[str, Any]:
    """arch / width / stem of a built backbone: what the evaluation's settings resolve to."""
    stem = "small" if isinstance(model.maxpool, nn.Identity) else "standard"
    return {"arch": model.arch, "width": model.conv1.out_channels, "stem": stem}


def _changed_tensor(model: nn.Module, frozen: dict[str, torch.Tensor]) -> str | None:
    """The first frozen tensor (everything but ``fc``) that differs from ``frozen``; None if none does."""
    inner = unwrap(model)
    state = inner.state_dict()
    return next((k for k, ref in frozen.items() if not k.startswith("fc.") and not torch.equal(state[k].cpu(), ref.cpu())),
                None)


def sanity_check(model: nn.Module, frozen: dict[str, torch.Tensor]) -> None:
    """Raise PCLError if any frozen tensor (everything but ``fc``) differs from its pretrained value."""
    key = _changed_tensor(model, frozen)
    if key is not None:
        raise PCLError(f"frozen weight '{key}' changed during linear training: the backbone must stay fixed "
                       f"(BatchNorm in eval mode, no gradient)")
    logger.info("sanity check passed: the %d frozen tensors are unchanged", len(frozen))


def _topk_correct(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    pred = output.topk(min(max(ks), output.shape[1]), dim=1).indices  # B x maxk
    hit = pred.eq(target[:, None])
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


# ----------------------------------------------------------------------------------------------------
# official protocol
# ----------------------------------------------------------------------------------------------------
def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epoch: int, device: torch.device,
                progress: bool = True, print_freq: int = 10, train_mode: bool = False,
                hint: str = "lower --lr") -> dict[str, float]:
    """One epoch. Linear probe: the whole model stays in eval mode (frozen BatchNorm statistics);
    ``train_mode`` (fine-tuning) puts it in train mode. A non-finite loss stops it (:class:`LossGuard`)."""
    model.train(train_mode)
    guard = LossGuard(device, print_freq, hint)
    lrs = [g["lr"] for g in optimizer.param_groups]
    step = -1
    meters = {name: AverageMeter() for name in ("loss", "top1", "top5")}
    bar = tqdm(loader, desc=f"linear epoch {epoch}", disable=not progress, leave=False)
    for step, (images, target, _) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        target = torch.as_tensor(target).to(device, non_blocking=True)
        output = model(images)
        loss = F.cross_entropy(output, target)
        guard.watch(loss, epoch, step, lrs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        c1, c5 = _topk_correct(output.detach(), target)
        b = target.shape[0]
        meters["loss"].update(loss.item(), b)
        meters["top1"].update(100.0 * c1 / b, b)
        meters["top5"].update(100.0 * c5 / b, b)
        if step % print_freq == 0:
            bar.set_postfix(loss=f"{meters['loss'].avg:.3f}", top1=f"{meters['top1'].avg:.1f}")
    guard.check(epoch, step, lrs)
    return {f"train_{k}": m.avg for k, m in meters.items()}


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, progress: bool = False,
             hint: str = "lower --lr") -> dict[str, float]:
    """Top-1/top-5 (percent) and mean loss over the whole split, summed over ranks. A non-finite loss (the model's
    outputs are NaN/inf: top-1 would count arg-maxes of NaN) is one PCLError on every rank, ending in ``hint``."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for images, target, _ in tqdm(loader, desc="validate", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        target = torch.as_tensor(target).to(device, non_blocking=True)
        output = model(images)
        c1, c5 = _topk_correct(output, target)
        totals += torch.tensor([F.cross_entropy(output, target, reduction="sum").item(), c1, c5, target.shape[0]],
                               dtype=torch.float64, device=device)
    dist_utils.all_reduce_sum(totals)
    n = max(totals[3].item(), 1.0)
    if not math.isfinite(totals[0].item()):
        raise PCLError(f"the validation loss is {totals[0].item() / n}: the model's outputs are not finite (it "
                       f"diverged), so its top-1 would mean nothing; {hint}")
    return {"val_loss": totals[0].item() / n, "top1": 100.0 * totals[1].item() / n,
            "top5": 100.0 * totals[2].item() / n}


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int, cfg: RunConfig, best: float,
           num_classes: int, **extra: Any) -> dict[str, Any]:
    return ckpt_io.checkpoint_state(model, epoch + 1, cfg.arch, optimizer,
                                    {"width": cfg.width, "stem": cfg.stem, "image_size": cfg.image_size},
                                    best_acc1=best, num_classes=num_classes, pretrained=cfg.pretrained, **extra)


def _same_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def resume_settings(cfg: RunConfig) -> RunConfig:
    """--resume LINEAR_CKPT: its head was trained on the backbone it records (``pretrained``), which must be
    --pretrained's when both are given; -a/--width/--stem default to what it records and must agree with it."""
    ckpt = ckpt_io.load_checkpoint(cfg.resume)
    ckpt_io.require_linear_checkpoint(ckpt, cfg.resume)
    recorded = ckpt.get("pretrained") or ""
    if cfg.pretrained and recorded and not _same_path(recorded, cfg.pretrained):
        raise PCLError(f"--resume {cfg.resume} is a linear head trained on {recorded}, not on --pretrained "
                       f"{cfg.pretrained}: give --pretrained {recorded}, or drop --resume to train a new head")
    if cfg.pretrained and not recorded:
        logger.warning("--resume %s does not record its pretrained checkpoint (official layout): its backbone "
                       "weights are compared with --pretrained %s instead", cfg.resume, cfg.pretrained)
    stored = {"arch": ckpt.get("arch"), **{k: ckpt_io.model_config(ckpt, cfg.resume).get(k) for k in ("width", "stem")}}
    fill = {}
    for key, value in stored.items():
        given = getattr(cfg, key)
        if value is None or given == value:
            continue
        if given is not None:
            flag = "-a/--arch" if key == "arch" else f"--{key}"
            raise PCLError(f"{flag} {given} contradicts --resume {cfg.resume}, which was trained with {key} {value}: "
                           f"drop {flag} (it defaults to the checkpoint's) or resume another head")
        fill[key] = value
    return cfg.replace(**fill)


def _resume(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, frozen: dict[str, torch.Tensor],
            pretrained: str) -> tuple[int, float]:
    """Load the head (and backbone) of a linear checkpoint; its backbone must be --pretrained's when that is
    given, else it replaces ``frozen`` (what the sanity check compares with)."""
    ckpt = ckpt_io.load_checkpoint(path)
    ckpt_io.require_linear_checkpoint(ckpt, path)
    head = next(v for k, v in ckpt["state_dict"].items() if k.endswith("fc.weight"))
    classes = unwrap(model).fc.out_features
    if tuple(head.shape) != tuple(unwrap(model).fc.weight.shape):
        raise PCLError(f"--resume {path} is a head of {head.shape[0]} classes on {head.shape[-1]}-d features; the "
                       f"probe here has {classes} classes (the training labels or --num-classes) on "
                       f"{unwrap(model).fc.in_features}-d: resume it on the data and backbone it was trained on")
    ckpt_io.load_model_state(model, ckpt["state_dict"], path)
    changed = _changed_tensor(model, frozen)
    if changed is not None and pretrained:
        raise PCLError(f"--resume {path} was not trained on --pretrained {pretrained}: its backbone weights differ "
                       f"(first: {changed}); give the --pretrained it was trained on")
    inner = unwrap(model)
    frozen.update({k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if k in frozen})
    if optimizer is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise PCLError(f"--resume {path}: its optimizer state does not fit this head's SGD ({str(e)[:160]}); "
                           f"resume a linear_checkpoint.pth.tar eval_linear.py saved, or drop --resume") from None
    logger.info("resumed linear head from %s (epoch %d)", path, ckpt["epoch"])
    return int(ckpt["epoch"]), float(ckpt.get("best_acc1", 0.0))


def fit_linear(args: Any) -> dict[str, Any]:
    """Run the linear evaluation the flags ask for; returns the final/best accuracies."""
    cfg = RunConfig.of(args)
    cfg = cfg.replace(dataset=resolve_eval_dataset(cfg))
    device = prepare_eval(cfg)
    if cfg.resume:
        cfg = resume_settings(cfg)
    elif cfg.start_epoch >= cfg.epochs and not cfg.evaluate:
        raise PCLError(f"--start-epoch {cfg.start_epoch} is not below --epochs {cfg.epochs}: nothing to train")
    cfg = follow_checkpoint(cfg, cfg.pretrained or cfg.resume)
    eval_backbone(cfg)  # cheap input first: a bad --pretrained fails before the dataset is scanned
    torch.manual_seed(cfg.seed)
    data = build_labelled_data(data_settings(cfg))
    num_classes = cfg.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise PCLError(f"--num-classes {num_classes} is below the {data.num_classes} classes of the training labels "
                       f"(0-{data.num_classes - 1}): drop it (the labels' count is the default) or give at least "
                       f"{data.num_classes}")
    model, frozen = build_probe(cfg, num_classes)
    cfg = cfg.replace(**backbone_settings(model))
    model = model.to(device)
    logger.info("linear probe: %s (width %d, stem %s) from %s, %d classes, %d train / %d val images, %s",
                cfg.arch, cfg.width, cfg.stem, cfg.pretrained or (cfg.resume and f"--resume {cfg.resume}") or "random init",
                num_classes, len(data.train_labels),
                len(data.val_labels), "cached features (NOT the paper's protocol)" if cfg.cached_features
                else "official protocol")
    if cfg.cached_features:
        return fit_cached(model, frozen, data, cfg, device)
    if dist_utils.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2, "only fc.weight and fc.bias are trained"
    optimizer = torch.optim.SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start_epoch, best = cfg.start_epoch, 0.0
    if cfg.resume:
        start_epoch, best = _resume(cfg.resume, model, None if cfg.evaluate else optimizer, frozen, cfg.pretrained)
    if cfg.evaluate:
        if not cfg.resume:
            raise PCLError("--evaluate needs a trained linear head: pass --resume EXP/linear_best.pth.tar")
        result = validate(model, data.val_loader, device, dist_utils.is_main() and not cfg.no_progress,
                          f"the head in --resume {cfg.resume} (or its backbone) is broken; take an earlier one")
        logger.info("evaluate: top1 %.2f top5 %.2f", result["top1"], result["top5"])
        return result
    if start_epoch >= cfg.epochs:
        raise PCLError(f"nothing to train: --resume {cfg.resume} is at epoch {start_epoch} of --epochs {cfg.epochs}; "
                       f"raise --epochs to go on, or score it with --evaluate")
    return _linear_epochs(model, frozen, optimizer, data, cfg, device, start_epoch, best, num_classes)


def _linear_epochs(model: nn.Module, frozen: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   data: LabelledData, cfg: RunConfig, device: torch.device, start_epoch: int, best: float,
                   num_classes: int) -> dict[str, Any]:
    """The official protocol's epochs: train, validate, keep the last and the best head."""
    progress = dist_utils.is_main() and not cfg.no_progress
    run_log = RunLog(os.path.join(cfg.exp_dir, f"linear{('_' + cfg.id) if cfg.id else ''}"))
    stats: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            start = time.perf_counter()
            lr = adjust_learning_rate(optimizer, epoch, cfg.epochs, cfg.lr, cfg.cos, cfg.schedule)
            data.train_loader.set_epoch(epoch)
            stats = train_epoch(model, data.train_loader, optimizer, epoch, device, progress, cfg.print_freq)
            stats.update(validate(model, data.val_loader, device))
            best = max(best, stats["top1"])
            stats.update(epoch=epoch, lr=lr, best_top1=best, seconds=time.perf_counter() - start)
            run_log.record(stats)
            run_log.scalars(epoch, {f"linear/{k}": v for k, v in stats.items() if k != "epoch"})
            logger.info("linear epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch"))
            if dist_utils.is_main():
                state = _state(model, optimizer, epoch, cfg, best, num_classes)
                ckpt_io.save_checkpoint(state, os.path.join(cfg.exp_dir, LINEAR_LAST), last=None)
                if stats["top1"] >= best:
                    ckpt_io.save_checkpoint(state, os.path.join(cfg.exp_dir, LINEAR_BEST), last=None)
            if epoch == start_epoch:
                sanity_check(model, frozen)
    finally:
        run_log.close()
    logger.info("linear probe done: top1 %.2f (best %.2f) top5 %.2f", stats.get("top1", 0), best, stats.get("top5", 0))
    return {"top1": stats.get("top1"), "top5": stats.get("top5"), "best_top1": best}


# ----------------------------------------------------------------------------------------------------
# cached features (fast mode, not the paper's protocol)
# ----------------------------------------------------------------------------------------------------
def train_head(head: nn.Linear, train_views: torch.Tensor, train_labels: torch.Tensor, args: RunConfig,
               evaluate=None, start_epoch: int = 0) -> list[dict[str, float]]:
    """SGD on cached features with the protocol's optimiser and schedule.

    train_views: V x N x d (V >= 1 views per image; each epoch draws one view per image), train_labels: N.
    Batches of --batch-size (the total), shuffled by a seeded generator. ``evaluate(head) -> dict`` is called
    after each epoch. Returns the per-epoch stats.
    """
    optimizer = torch.optim.SGD(head.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    gen = torch.Generator(device=train_views.device).manual_seed(args.seed)
    v, n, _ = train_views.shape
    rows = torch.arange(n, device=train_views.device)
    guard = LossGuard(train_views.device, args.print_freq)
    history = []
    for epoch in range(start_epoch, args.epochs):
        lr = adjust_learning_rate(optimizer, epoch, args.epochs, args.lr, args.cos, args.schedule)
        view = torch.randint(v, (n,), generator=gen, device=train_views.device)
        feats = train_views[view, rows]  # N x d
        perm = torch.randperm(n, generator=gen, device=train_views.device)
        loss_sum = 0.0
        for step, s in enumerate(range(0, n, args.batch_size)):
            idx = perm[s:s + args.batch_size]
            loss = F.cross_entropy(head(feats[idx]), train_labels[idx])
            guard.watch(loss, epoch, step, lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * idx.numel()
        guard.check(epoch, step, lr)
        stats = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / n}
        if evaluate is not None:
            stats.update(evaluate(head))
        history.append(stats)
    return history


def probe_features(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                   test_labels: torch.Tensor, args: RunConfig) -> dict[str, Any]:
    """The cached-features probe on features already in memory: a fresh head, trained, then scored.

    For a study that has its frozen features (N x d, M x d) and labels (N, M) in hand, with no checkpoint or
    dataset for :func:`fit_linear` to load. ``args`` is what ``parse_args(build_linear_parser(), argv)``
    returns, so the optimiser and schedule are the protocol's flags and defaults (SGD lr 5, momentum 0.9, wd 0,
    batch 256, lr /10 at --schedule). The head is ``nn.Linear(d, --num-classes or max label + 1)`` drawn after
    ``torch.manual_seed(--seed)`` and re-initialised N(0, 0.01) with a zero bias, as :func:`build_probe` does;
    it is trained by :func:`train_head` on the one view ``train_feats``. Returns ``top1`` (percent of the test
    rows whose arg-max class is their label, after the last epoch), the trained ``head`` and the per-epoch
    ``history``.
    """
    torch.manual_seed(args.seed)
    head = nn.Linear(train_feats.shape[1], args.get("num_classes") or int(train_labels.max()) + 1)
    head.weight.data.normal_(0, 0.01)
    head.bias.data.zero_()
    history = train_head(head, train_feats[None], train_labels, args)
    with torch.no_grad():
        top1 = float((head(test_feats).argmax(1) == test_labels).float().mean() * 100)
    return {"top1": top1, "head": head, "history": history}


def fit_cached(model: nn.Module, frozen: dict[str, torch.Tensor], data: LabelledData, args: RunConfig,
               device: torch.device) -> dict[str, Any]:
    progress = dist_utils.is_main() and not args.no_progress
    start = time.perf_counter()
    head = model.fc
    model.fc = nn.Identity()
    n_train, n_val = len(data.train_labels), len(data.val_labels)
    extract = lambda loader, n, desc: extract_features(model, loader, device, n, False, progress, desc)  # noqa: E731
    views = [extract(data.train_eval_loader, n_train, "train features")]
    for i in range(args.cached_views):
        if data.augment_loader is None:
            raise PCLError("--cached-views needs a dataset with an augmented training pass")
        views.append(extract(data.augment_loader(i), n_train, f"view {i + 1}"))
    train_views = torch.stack(views[1:] if args.cached_views else views)  # V x N x d
    val_feats = extract(data.val_loader, n_val, "val features")
    extract_seconds = time.perf_counter() - start
    model.fc = head
    sanity_check(model, frozen)
    train_labels, val_labels = data.train_labels.to(device), data.val_labels.to(device)

    @torch.no_grad()
    def evaluate(h: nn.Linear) -> dict[str, float]:
        out = h(val_feats)
        c1, c5 = _topk_correct(out, val_labels)
        return {"top1": 100.0 * c1 / n_val, "top5": 100.0 * c5 / n_val}

    history = train_head(head, train_views, train_labels, args, evaluate, args.start_epoch)
    total = time.perf_counter() - start
    best = max(h["top1"] for h in history)
    run_log = RunLog(os.path.join(args.exp_dir, f"linear_cached{('_' + args.id) if args.id else ''}"))
    for h in history:
        run_log.record(h)
        run_log.scalars(h["epoch"], {f"linear_cached/{k}": v for k, v in h.items() if k != "epoch"})
    run_log.close()
    if dist_utils.is_main():
        state = _state(model, None, args.epochs - 1, args, best, head.out_features, cached_features=True)
        ckpt_io.save_checkpoint(state, os.path.join(args.exp_dir, "linear_cached.pth.tar"), last=None)
    last = history[-1]
    logger.info("cached linear probe (NOT the paper's protocol; %d train view(s)): top1 %.2f (best %.2f) top5 %.2f "
                "in %.1f s (features %.1f s)", train_views.shape[0], last["top1"], best, last["top5"], total,
                extract_seconds)
    return {"top1": last["top1"], "top5": last["top5"], "best_top1": best, "seconds": total,
            "extract_seconds": extract_seconds}
