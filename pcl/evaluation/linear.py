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

import argparse
import logging
import os
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pcl import PCLError, checkpoint as ckpt_io, distributed as dist_utils
from pcl.data import LabelledData, build_labelled_data
from pcl.log import AverageMeter, RunLog, setup_logging
from pcl.model import build_backbone
from pcl.schedule import adjust_learning_rate

logger = logging.getLogger("pcl")

LINEAR_LAST = "linear_checkpoint.pth.tar"
LINEAR_BEST = "linear_best.pth.tar"


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------
def build_probe(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A torchvision ResNet: the pretrained query backbone (frozen) with a fresh ``fc`` (num_classes).

    Returns the model (on the CPU) and a copy of the frozen weights for :func:`sanity_check`.
    """
    if args.pretrained:
        model = ckpt_io.load_backbone(args.pretrained, args.arch, width=args.width, stem=args.stem)
        args.arch = model.arch
    else:
        args.arch = args.arch or "resnet50"
        model = build_backbone(args.arch, args.width or 64, args.stem or "standard")
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.fc = nn.Linear(model.feature_dim, num_classes)
    model.fc.weight.data.normal_(mean=0.0, std=0.01)
    model.fc.bias.data.zero_()
    for name, param in model.named_parameters():
        param.requires_grad = name in ("fc.weight", "fc.bias")
    return model.eval(), frozen


def sanity_check(model: nn.Module, frozen: dict[str, torch.Tensor]) -> None:
    """Raise PCLError if any frozen tensor (everything but ``fc``) differs from its pretrained value."""
    inner = model.module if hasattr(model, "module") else model
    state = inner.state_dict()
    for key, ref in frozen.items():
        if key.startswith("fc."):
            continue
        if not torch.equal(state[key].cpu(), ref.cpu()):
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
                progress: bool = True, print_freq: int = 10, train_mode: bool = False) -> dict[str, float]:
    """One epoch. Linear probe: the whole model stays in eval mode (frozen BatchNorm statistics);
    ``train_mode`` (fine-tuning) puts it in train mode."""
    model.train(train_mode)
    meters = {name: AverageMeter() for name in ("loss", "top1", "top5")}
    bar = tqdm(loader, desc=f"linear epoch {epoch}", disable=not progress, leave=False)
    for step, (images, target, _) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        target = torch.as_tensor(target).to(device, non_blocking=True)
        output = model(images)
        loss = F.cross_entropy(output, target)
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
    return {f"train_{k}": m.avg for k, m in meters.items()}


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, progress: bool = False) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean loss over the whole split, summed over ranks."""
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
    return {"val_loss": totals[0].item() / n, "top1": 100.0 * totals[1].item() / n,
            "top5": 100.0 * totals[2].item() / n}


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, args: argparse.Namespace,
           best: float, num_classes: int) -> dict[str, Any]:
    return {"epoch": epoch + 1, "arch": args.arch, "state_dict": ckpt_io.model_state(model),
            "optimizer": optimizer.state_dict(), "best_acc1": best, "num_classes": num_classes,
            "pretrained": args.pretrained, "model_config": {"width": args.width, "stem": args.stem}}


def _resume(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[int, float]:
    ckpt = ckpt_io.load_checkpoint(path)
    ckpt_io.load_model_state(model, ckpt["state_dict"], path)
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    logger.info("resumed linear head from %s (epoch %d)", path, ckpt["epoch"])
    return int(ckpt["epoch"]), float(ckpt.get("best_acc1", 0.0))


def resolve_eval_dataset(args: argparse.Namespace) -> None:
    """--dataset auto means an ImageFolder root with train/ and val/; without DIR, an error naming the fix."""
    if args.dataset == "auto":
        if args.data is None:
            raise PCLError("no data: give a dataset root DIR (ImageFolder with train/ and val/), or --dataset demo")
        args.dataset = "imagefolder"


def prepare_eval(args: argparse.Namespace) -> torch.device:
    """Logging, process group and device, per-process batch (``args.global_batch_size`` keeps the total)."""
    setup_logging(args.exp_dir, args.debug, args.rank if args.multiprocessing_distributed else None)
    device = dist_utils.init(args)
    world = dist_utils.world_size()
    if args.batch_size % world:
        raise PCLError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    args.global_batch_size, args.batch_size = args.batch_size, args.batch_size // world
    if args.epochs <= 0:
        raise PCLError("--epochs must be positive")
    resolve_eval_dataset(args)
    return device


def check_pretrained(args: argparse.Namespace) -> None:
    """Load --pretrained once up front (the model is built again later): its errors come before any data work."""
    if args.pretrained:
        ckpt_io.load_backbone(args.pretrained, args.arch, width=args.width, stem=args.stem)


def fit_linear(args: argparse.Namespace) -> dict[str, Any]:
    """Run the linear evaluation the flags ask for; returns the final/best accuracies."""
    device = prepare_eval(args)
    if args.lr <= 0:
        raise PCLError("--lr must be positive")
    check_pretrained(args)  # cheap input first: a bad --pretrained fails before the dataset is scanned
    torch.manual_seed(args.seed)
    data = build_labelled_data(args)
    num_classes = args.num_classes or data.num_classes
    model, frozen = build_probe(args, num_classes)
    width, stem = model.conv1.out_channels, ("small" if isinstance(model.maxpool, nn.Identity) else "standard")
    args.width, args.stem = width, stem
    model = model.to(device)
    logger.info("linear probe: %s (width %d, stem %s) from %s, %d classes, %d train / %d val images, %s",
                args.arch, width, stem, args.pretrained or "random init", num_classes, len(data.train_labels),
                len(data.val_labels), "cached features (NOT the paper's protocol)" if args.cached_features
                else "official protocol")
    if args.cached_features:
        return fit_cached(model, frozen, data, args, device)
    if dist_utils.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2, "only fc.weight and fc.bias are trained"
    optimizer = torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    best = 0.0
    if args.resume:
        args.start_epoch, best = _resume(args.resume, model, None if args.evaluate else optimizer)
    progress = dist_utils.is_main() and not args.no_progress
    if args.evaluate:
        if not args.resume:
            raise PCLError("--evaluate needs a trained linear head: pass --resume EXP/linear_best.pth.tar")
        result = validate(model, data.val_loader, device, progress)
        logger.info("evaluate: top1 %.2f top5 %.2f", result["top1"], result["top5"])
        return result
    run_log = RunLog(os.path.join(args.exp_dir, f"linear{('_' + args.id) if args.id else ''}"))
    stats: dict[str, Any] = {}
    try:
        for epoch in range(args.start_epoch, args.epochs):
            start = time.perf_counter()
            lr = adjust_learning_rate(optimizer, epoch, args.epochs, args.lr, args.cos, args.schedule)
            data.train_loader.set_epoch(epoch)
            stats = train_epoch(model, data.train_loader, optimizer, epoch, device, progress, args.print_freq)
            stats.update(validate(model, data.val_loader, device))
            best = max(best, stats["top1"])
            stats.update(epoch=epoch, lr=lr, best_top1=best, seconds=time.perf_counter() - start)
            run_log.record(stats)
            run_log.scalars(epoch, {f"linear/{k}": v for k, v in stats.items() if k != "epoch"})
            logger.info("linear epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch"))
            if dist_utils.is_main():
                state = _state(model, optimizer, epoch, args, best, num_classes)
                ckpt_io.save_checkpoint(state, os.path.join(args.exp_dir, LINEAR_LAST), last=None)
                if stats["top1"] >= best:
                    ckpt_io.save_checkpoint(state, os.path.join(args.exp_dir, LINEAR_BEST), last=None)
            if epoch == args.start_epoch:
                sanity_check(model, frozen)
    finally:
        run_log.close()
    logger.info("linear probe done: top1 %.2f (best %.2f) top5 %.2f", stats.get("top1", 0), best, stats.get("top5", 0))
    return {"top1": stats.get("top1"), "top5": stats.get("top5"), "best_top1": best}


# ----------------------------------------------------------------------------------------------------
# cached features (fast mode, not the paper's protocol)
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_labelled(backbone: nn.Module, loader, device: torch.device, num_samples: int,
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Pooled features (N x d, unnormalised: the linear head's input) of every sample, gathered exactly."""
    backbone.eval()
    rows, idx = [], []
    for images, _, index in tqdm(loader, desc=desc, disable=not progress, leave=False):
        rows.append(backbone(images.to(device, non_blocking=True)).float())
        idx.append(torch.as_tensor(index).to(device))
    return dist_utils.gather_rows_exact(torch.cat(rows), torch.cat(idx), num_samples)


def train_head(head: nn.Linear, train_views: torch.Tensor, train_labels: torch.Tensor, args: argparse.Namespace,
               evaluate=None, start_epoch: int = 0) -> list[dict[str, float]]:
    """SGD on cached features with the protocol's optimiser and schedule.

    train_views: V x N x d (V >= 1 views per image; each epoch draws one view per image), train_labels: N.
    Batches of the global batch size, shuffled by a seeded generator. ``evaluate(head) -> dict`` is called
    after each epoch. Returns the per-epoch stats.
    """
    optimizer = torch.optim.SGD(head.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    gen = torch.Generator(device=train_views.device).manual_seed(args.seed)
    v, n, _ = train_views.shape
    rows = torch.arange(n, device=train_views.device)
    history = []
    for epoch in range(start_epoch, args.epochs):
        lr = adjust_learning_rate(optimizer, epoch, args.epochs, args.lr, args.cos, args.schedule)
        view = torch.randint(v, (n,), generator=gen, device=train_views.device)
        feats = train_views[view, rows]  # N x d
        perm = torch.randperm(n, generator=gen, device=train_views.device)
        loss_sum = 0.0
        for s in range(0, n, args.global_batch_size):
            idx = perm[s:s + args.global_batch_size]
            loss = F.cross_entropy(head(feats[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * idx.numel()
        stats = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / n}
        if evaluate is not None:
            stats.update(evaluate(head))
        history.append(stats)
    return history


def fit_cached(model: nn.Module, frozen: dict[str, torch.Tensor], data: LabelledData, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    progress = dist_utils.is_main() and not args.no_progress
    start = time.perf_counter()
    head = model.fc
    model.fc = nn.Identity()
    n_train, n_val = len(data.train_labels), len(data.val_labels)
    views = [extract_labelled(model, data.train_eval_loader, device, n_train, progress, "train features")]
    for i in range(args.cached_views):
        if data.augment_loader is None:
            raise PCLError("--cached-views needs a dataset with an augmented training pass")
        views.append(extract_labelled(model, data.augment_loader(i), device, n_train, progress, f"view {i + 1}"))
    train_views = torch.stack(views[1:] if args.cached_views else views)  # V x N x d
    val_feats = extract_labelled(model, data.val_loader, device, n_val, progress, "val features")
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
        state = {"epoch": args.epochs, "arch": args.arch, "state_dict": ckpt_io.model_state(model), "best_acc1": best,
                 "num_classes": head.out_features, "pretrained": args.pretrained, "cached_features": True,
                 "model_config": {"width": args.width, "stem": args.stem}}
        ckpt_io.save_checkpoint(state, os.path.join(args.exp_dir, "linear_cached.pth.tar"), last=None)
    last = history[-1]
    logger.info("cached linear probe (NOT the paper's protocol; %d train view(s)): top1 %.2f (best %.2f) top5 %.2f "
                "in %.1f s (features %.1f s)", train_views.shape[0], last["top1"], best, last["top5"], total,
                extract_seconds)
    return {"top1": last["top1"], "top5": last["top5"], "best_top1": best, "seconds": total,
            "extract_seconds": extract_seconds}
