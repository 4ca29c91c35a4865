"""Semi-supervised ImageNet: fine-tune the whole pretrained network on 1% or 10% of the labels.

Settings follow SwAV's ``eval_semisup.py`` (facebookresearch/swav; its README gives the per-subset learning
rates): 20 epochs, batch 256 in total, SGD momentum 0.9, weight decay 0, lr of the backbone 0.02 (1%) / 0.01
(10%) and of the new linear layer 5 (1%) / 0.2 (10%), both ×0.2 at epochs 12 and 16, RandomResizedCrop(224) +
flip for training, Resize(256) + CenterCrop(224) for validation, BatchNorm in train mode (SyncBatchNorm with
several processes), top-1/top-5 on the full validation set. The subsets are SimCLR's lists
(``imagenet_subsets/{1,10}percent.txt``: one image name per line), read from ``--subset`` and never downloaded.
On ``--dataset demo`` the subset is a seeded ``--labels-perc`` % sample of each class.

    python -m pcl.evaluation.semisup DIR --labels-perc 1 --subset 1percent.txt --pretrained CKPT
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import torch
import torch.nn as nn

from pcl import PCLError, checkpoint as ckpt_io, distributed as dist_utils
from pcl.data import build_labelled_data, data_settings, per_class_fraction, read_subset
from pcl.data.registry import spec
from pcl.config import RunConfig
from pcl.evaluation.common import eval_backbone, follow_checkpoint, prepare_eval, resolve_eval_dataset
from pcl.evaluation.linear import backbone_settings, build_probe, train_epoch, validate
from pcl.log import RunLog
from pcl.model import unwrap
from pcl.schedule import adjust_learning_rate

logger = logging.getLogger("pcl")

SWAV_LR = {1: (0.02, 5.0), 10: (0.01, 0.2)}  # labels percent -> (backbone lr, last-layer lr)


def build_parser() -> argparse.ArgumentParser:
    from pcl.config import eval_command_parser

    p = eval_command_parser("Fine-tune the whole network on 1% / 10% of ImageNet labels (SwAV settings)", batch=None)
    g = p.add_argument_group("fine-tuning (SwAV eval_semisup.py defaults)")
    g.add_argument("--labels-perc", default=10, type=int, choices=[1, 10], help="which subset (sets the lrs)")
    g.add_argument("--subset", default=None, help="the subset list file (SimCLR's 1percent.txt / 10percent.txt)")
    g.add_argument("--epochs", default=20, type=int)
    g.add_argument("-b", "--batch-size", default=256, type=int, help="total batch size over all processes")
    g.add_argument("--lr", default=None, type=float, help="backbone lr (default: 0.02 for 1%%, 0.01 for 10%%)")
    g.add_argument("--lr-last-layer", default=None, type=float, help="head lr (default: 5 for 1%%, 0.2 for 10%%)")
    g.add_argument("--decay-epochs", default=[12, 16], nargs="*", type=int)
    g.add_argument("--gamma", default=0.2, type=float, help="lr factor at each decay epoch")
    g.add_argument("--momentum", default=0.9, type=float)
    g.add_argument("--wd", "--weight-decay", default=0.0, type=float, dest="weight_decay")
    g.add_argument("-p", "--print-freq", default=50, type=int)
    p.set_defaults(crop_min_scale=0.08)
    return p


def _subset_picker(args: RunConfig):
    if spec(args.dataset, "data").in_memory:
        return lambda labels: per_class_fraction(labels, args.labels_perc, args.seed).tolist()
    if not args.subset:
        raise PCLError("--subset FILE is required: the 1% / 10% image list (SimCLR's imagenet_subsets/*percent.txt)")
    train_dir = os.path.join(args.data, "train")
    return lambda base: read_subset(train_dir, base.samples, args.subset)


def fit_semisup(args: Any) -> dict[str, Any]:
    cfg = RunConfig.of(args)
    lr, lr_head = SWAV_LR[cfg.labels_perc]
    cfg = cfg.replace(dataset=resolve_eval_dataset(cfg), lr=cfg.lr if cfg.lr is not None else lr,
                      lr_last_layer=cfg.lr_last_layer if cfg.lr_last_layer is not None else lr_head)
    device = prepare_eval(cfg)
    cfg = follow_checkpoint(cfg)
    eval_backbone(cfg)  # cheap input first
    torch.manual_seed(cfg.seed)
    data = build_labelled_data(data_settings(cfg), _subset_picker(cfg))
    model, _ = build_probe(cfg, data.num_classes)
    cfg = cfg.replace(**backbone_settings(model))
    for param in model.parameters():
        param.requires_grad = True
    model = model.to(device)
    if dist_utils.world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _finetune(model, data, cfg, device)


def _finetune(model: nn.Module, data: Any, args: RunConfig, device: torch.device) -> dict[str, Any]:
    """SwAV's fine-tuning epochs: two lrs (backbone, head), step decay, best top-1 kept."""
    inner = unwrap(model)
    head = [inner.fc.weight, inner.fc.bias]
    trunk = [p for n, p in inner.named_parameters() if not n.startswith("fc.")]
    optimizer = torch.optim.SGD([{"params": trunk}, {"params": head, "lr": args.lr_last_layer}], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    logger.info("fine-tuning %s from %s on %d labelled images (%d%%), %d classes; lr %g / head %g",
                args.arch, args.pretrained or "random init", len(data.train_labels), args.labels_perc,
                data.num_classes, args.lr, args.lr_last_layer)
    progress = dist_utils.is_main() and not args.no_progress
    run_log = RunLog(os.path.join(args.exp_dir, f"semisup_{args.labels_perc}pct"))
    best: dict[str, float] = {"top1": 0.0, "top5": 0.0}
    stats: dict[str, Any] = {}
    try:
        for epoch in range(args.epochs):
            start = time.perf_counter()
            adjust_learning_rate(optimizer, epoch, args.epochs, [args.lr, args.lr_last_layer],
                                 milestones=args.decay_epochs, gamma=args.gamma)
            data.train_loader.set_epoch(epoch)
            stats = train_epoch(model, data.train_loader, optimizer, epoch, device, progress, args.print_freq,
                                train_mode=True, hint="lower --lr / --lr-last-layer")
            stats.update(validate(model, data.val_loader, device, hint="lower --lr / --lr-last-layer"))
            stats.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start)
            if stats["top1"] > best["top1"]:
                best = {"top1": stats["top1"], "top5": stats["top5"]}
            run_log.record(stats)
            run_log.scalars(epoch, {f"semisup/{k}": v for k, v in stats.items() if k != "epoch"})
            logger.info("fine-tune epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch"))
            if dist_utils.is_main():
                state = ckpt_io.checkpoint_state(model, epoch + 1, args.arch, optimizer,
                                                 {"width": args.width, "stem": args.stem, "image_size": args.image_size},
                                                 best=best)
                ckpt_io.save_checkpoint(state, os.path.join(args.exp_dir, f"semisup_{args.labels_perc}pct.pth.tar"),
                                        last=None)
    finally:
        run_log.close()
    logger.info("fine-tuning with %d%% of labels: top-1 %.2f top-5 %.2f (last epoch), best top-1 %.2f",
                args.labels_perc, stats.get("top1", 0), stats.get("top5", 0), best["top1"])
    return {"top1": stats.get("top1"), "top5": stats.get("top5"), "best": best, "lr": args.lr,
            "lr_last_layer": args.lr_last_layer}


if __name__ == "__main__":
    from pcl.launch import main

    sys.exit(main(build_parser, fit_semisup))
