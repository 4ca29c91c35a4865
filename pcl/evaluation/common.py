"""What every evaluation shares: the dataset default, the process setup, the backbone from --pretrained (or a
random initialisation) and the labelled feature pass. Protocols and command lines build on these.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from pcl import PCLError, checkpoint as ckpt_io, distributed as dist_utils
from pcl.data.registry import resolve_auto
from pcl.features import extract_features
from pcl.settings import DistSettings, RunConfig
from pcl.log import setup_logging
from pcl.model import build_backbone

logger = logging.getLogger("pcl")


def resolve_eval_dataset(args: RunConfig) -> str:
    """--dataset auto means an ImageFolder root with train/ (and val/); without DIR, an error naming the fix."""
    return resolve_auto(args.dataset, args.data, "ImageFolder with train/ and val/")


# what an evaluation uses when neither the command line nor the checkpoint says (an official checkpoint records its
# arch only; ImageNet at 224 px, torchvision's ResNet)
EVAL_DEFAULTS = {"arch": "resnet50", "width": 64, "stem": "standard", "image_size": 224}
FLAGS = {"arch": "-a", "width": "--width", "stem": "--stem", "image_size": "--image-size"}


def checkpoint_settings(path: str) -> dict[str, Any]:
    """What checkpoint ``path`` records of the backbone and its input: arch, width, stem, image size (None where
    it records nothing: official checkpoints hold only their arch). Ours keep the run's flags in ``args``, the
    backbone in ``model_config``; the linear / fine-tuning heads of the evaluations keep theirs in ``model_config``."""
    ckpt = ckpt_io.load_checkpoint(path)
    config, args = ckpt.get("model_config") or {}, ckpt.get("args") or {}
    if not isinstance(config, dict) or not isinstance(args, dict):
        return {"arch": ckpt.get("arch")}
    stored = {"arch": ckpt.get("arch"), **{k: config.get(k, args.get(k)) for k in ("width", "stem", "image_size")}}
    return {k: v for k, v in stored.items() if v is not None}


def follow_checkpoint(args: RunConfig, path: str | None = None) -> RunConfig:
    """The evaluation's -a/--width/--stem/--image-size: each one not given (None) is the checkpoint's (``path``,
    default --pretrained), else :data:`EVAL_DEFAULTS`. A 32 px checkpoint is then evaluated at 32 px, not at 224
    (another number, and far slower). A given image size that differs from the checkpoint's is evaluated, with one
    warning naming both; a given architecture setting that differs is an error (its weights cannot load)."""
    path = path if path is not None else args.pretrained
    stored = checkpoint_settings(path) if path else {}
    resolved = {}
    for key, default in EVAL_DEFAULTS.items():
        given, saved = args.get(key), stored.get(key)
        resolved[key] = given if given is not None else saved if saved is not None else default
        if given is None or saved is None or given == saved:
            continue
        if key == "image_size":
            logger.warning("--image-size %d differs from the %d px that %s was trained at: evaluating at %d px (drop "
                           "--image-size to use the checkpoint's)", given, saved, path, given)
            continue
        trained = " ".join(f"{FLAGS[k]} {stored[k]}" for k in ("arch", "width", "stem") if k in stored)
        raise PCLError(f"checkpoint {path} does not fit architecture '{resolved['arch']}' ({FLAGS[key]} {given}): it "
                       f"was trained with {trained}; drop {FLAGS[key]} (the evaluations take the checkpoint's)")
    return args.replace(**resolved)


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
    return setup_logging(args.exp_dir, args.debug, dist_utils.spawned_rank(DistSettings.of(args)))


def prepare_eval(args: RunConfig) -> torch.device:
    """Logging, process group and device of an evaluation run (the batch is divided among the processes where
    the data is built)."""
    setup_eval_logging(args)
    device = dist_utils.init(DistSettings.of(args))
    world = dist_utils.world_size()
    if args.batch_size % world:
        raise PCLError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    return device


def labelled_features(args: RunConfig, splits: tuple[str, ...] = ("train", "val")
                      ) -> tuple[torch.Tensor | None, ...]:
    """L2-normalised frozen features and labels of the labelled train (and val) split of --dataset:
    (train_feats, train_labels, val_feats, val_labels) on the CPU, None for a split not asked for."""
    from pcl.data import build_labelled_data, data_settings

    device = dist_utils.init(DistSettings.of(args))
    backbone = eval_backbone(args, device)  # cheap input first: a bad --pretrained fails before the data is read
    data = build_labelled_data(data_settings(args))
    out: list[torch.Tensor | None] = []
    for split, loader, labels in (("train", data.train_eval_loader, data.train_labels),
                                  ("val", data.val_loader, data.val_labels)):
        if split in splits:
            feats = extract_features(backbone, loader, device, len(labels)).cpu()
            check_finite_features(feats, args.pretrained, split)
            out += [feats, labels.cpu()]
        else:
            out += [None, None]
    return tuple(out)


def check_finite_features(feats: torch.Tensor, pretrained: str, split: str) -> None:
    """Refuse features with NaN/inf rows (scores computed on them are silently wrong), naming the checkpoint."""
    bad = int((~torch.isfinite(feats)).any(dim=1).sum()) if feats.numel() else 0
    if bad:
        source = f"checkpoint {pretrained}" if pretrained else "the random initialisation (no --pretrained)"
        raise PCLError(f"{bad} of {feats.shape[0]} {split} features of {source} are NaN/inf: its weights or BatchNorm "
                       f"statistics are broken (a diverged run?); take an earlier checkpoint")


class LossGuard:
    """Stops an evaluation's training loop at a non-finite loss instead of finishing at chance accuracy.

    Each step's loss is folded into a device-side flag (no host sync); :meth:`check` runs every ``every`` steps
    and at the epoch's end, sums the flag over ranks (one all-reduce, at the same steps on every rank), and
    raises the same one-line PCLError on every rank before anything of the epoch is saved."""

    def __init__(self, device: Any, every: int = 1, hint: str = "lower --lr") -> None:
        self.every, self.hint = max(int(every), 1), hint
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.at = torch.zeros(2, dtype=torch.float64, device=device)  # first bad step, its loss

    def watch(self, loss: torch.Tensor, epoch: int, step: int, lr: Any) -> None:
        """Record this step's loss; check at every ``every``-th step."""
        value = loss.detach().double().reshape(())
        bad = ~torch.isfinite(value)
        here = torch.stack([torch.full_like(value, float(step)), value])
        self.at = torch.where(bad & ~self.seen, here, self.at)
        self.seen |= bad
        if step % self.every == 0:
            self.check(epoch, step, lr)

    def check(self, epoch: int, step: int, lr: Any) -> None:
        """Raise on every rank when any rank has seen a non-finite loss (call at the same point on all ranks)."""
        flag = dist_utils.all_reduce_sum(self.seen.to(torch.float32).reshape(1))
        if float(flag) == 0:
            return
        lrs = "/".join(f"{x:.4g}" for x in (lr if isinstance(lr, (list, tuple)) else [lr]))
        tail = f"; {self.hint} (no checkpoint was written for this epoch)"
        if not bool(self.seen):
            raise PCLError(f"non-finite loss on another rank by epoch {epoch} step {step} (lr={lrs}){tail}")
        first, loss = self.at.tolist()
        raise PCLError(f"non-finite loss at epoch {epoch} step {int(first)}: loss={loss:.4g} lr={lrs}{tail}")
