"""The one learning-rate schedule, shared by pretraining, the linear probe and fine-tuning: per epoch, cosine
over the run or a step decay at milestones, computed as the official MoCo/PCL scripts compute it."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def scheduled_lr(base: float, epoch: int, epochs: int, cos: bool = False, milestones: Sequence[int] = (),
                 gamma: float = 0.1) -> float:
    """The learning rate of ``epoch`` (0-based): ``base * 0.5 * (1 + cos(pi * epoch / epochs))`` with ``cos``,
    else ``base`` times ``gamma`` for every milestone reached (multiplied in turn, as official)."""
    lr = base
    if cos:
        lr *= 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    else:
        for milestone in milestones:
            lr *= gamma if epoch >= milestone else 1.0
    return lr


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: int, epochs: int, base: float | Sequence[float],
                         cos: bool = False, milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Set each parameter group's lr for ``epoch`` (``base``: one lr for every group, or one per group); returns
    the first group's."""
    bases = [base] * len(optimizer.param_groups) if isinstance(base, (int, float)) else list(base)
    for group, group_base in zip(optimizer.param_groups, bases, strict=True):
        group["lr"] = scheduled_lr(group_base, epoch, epochs, cos, milestones, gamma)
    return optimizer.param_groups[0]["lr"]
