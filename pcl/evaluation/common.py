"""What every evaluation shares: the dataset default, the process setup, the backbone from --pretrained (or a
random initialisation) and the labelled feature pass. Protocols and command lines build on these.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from pcl import PCLError, checkpoint as ckpt_io, distributed as dist_utils
from pcl.evaluation.metrics import extract_features
from pcl.settings import RunConfig
from pcl.log import setup_logging
from pcl.model import build_backbone

logger = logging.getLogger("pcl")


def resolve_eval_dataset(args: RunConfig) -> str:
    """--dataset auto means an ImageFolder root with train/ (and val/); without DIR, an error naming the fix."""
    if args.dataset != "auto":
        return args.dataset
    if args.data is None:
        raise PCLError("no data: give a dataset root DIR (ImageFolder with train/ and val/), or --dataset demo")
    return "imagefolder"


def eval_backbone(args: RunConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen backbone an evaluation measures, in eval mode on ``device``: the query encoder of --pretrained
    (ours or official; -a/--width/--stem default to the checkpoint's and must match it when given), or with no
    --pretrained a random initialisation seeded by --seed (the baseline). ``.arch`` names its architecture."""
    if args.pretrained:
        model = ckpt_io.load_backbone(args.pretrained, args.arch, width=args.width, stem=args.stem)
    else:
        torch.manual_seed(args.seed)
        model = build_backbone(args.arch or "resnet50", args.width or 64, args.stem or "standard")
        model.arch = args.arch or "resnet50"
    return model.to(device).eval()


def setup_eval_logging(args: RunConfig) -> logging.Logger:
    """Logging of an evaluation process, as pretraining's: a worker of the spawn launcher
    (--multiprocessing-distributed) logs as its global rank (--rank * nproc + local_rank), so only global rank 0
    logs INFO and writes EXP_DIR/train.log, the others WARNING and above with their own rank in the prefix."""
    return setup_logging(args.exp_dir, args.debug, dist_utils.spawned_rank(args))


def prepare_eval(args: RunConfig) -> torch.device:
    """Logging, process group and device of an evaluation run (the batch is divided among the processes where
    the data is built)."""
    setup_eval_logging(args)
    device = dist_utils.init(args)
    world = dist_utils.world_size()
    if args.batch_size % world:
        raise PCLError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    return device


def labelled_features(args: RunConfig, splits: tuple[str, ...] = ("train", "val")
                      ) -> tuple[torch.Tensor | None, ...]:
    """L2-normalised frozen features and labels of the labelled train (and val) split of --dataset:
    (train_feats, train_labels, val_feats, val_labels) on the CPU, None for a split not asked for."""
    from pcl.data import build_labelled_data

    device = dist_utils.init(args)
    backbone = eval_backbone(args, device)  # cheap input first: a bad --pretrained fails before the data is read
    data = build_labelled_data(args)
    out: list[torch.Tensor | None] = []
    for split, loader, labels in (("train", data.train_eval_loader, data.train_labels),
                                  ("val", data.val_loader, data.val_labels)):
        if split in splits:
            out += [extract_features(backbone, loader, device, len(labels)).cpu(), labels.cpu()]
        else:
            out += [None, None]
    return tuple(out)
