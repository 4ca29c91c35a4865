"""Console logging, JSON-lines log and TensorBoard, all written by rank 0 only (no print patching)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from pcl import distributed as dist_utils


def process_rank(hint: int | None = None) -> int:
    """This process's global rank, also before the process group exists: the group's, else torchrun's RANK,
    else ``hint`` (what the spawn launcher assigned), else 0."""
    if dist_utils.is_dist():
        return dist_utils.rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return max(hint or 0, 0)


def setup_logging(exp_dir: str | None = None, debug: bool = False, rank: int | None = None) -> logging.Logger:
    """Rank 0 logs INFO to stderr (and EXP_DIR/train.log); other ranks only WARNING and above, to stderr.
    ``rank``: the launcher's rank for this process when the process group is not up yet."""
    logger = logging.getLogger("pcl")
    logger.handlers.clear()
    logger.propagate = False
    level = logging.DEBUG if debug else logging.INFO
    rank = process_rank(rank)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    if exp_dir and rank == 0:
        from pcl import PCLError

        if os.path.exists(exp_dir) and not os.path.isdir(exp_dir):
            raise PCLError(f"--exp-dir {exp_dir} is a file, not a folder")
        try:
            os.makedirs(exp_dir, exist_ok=True)
            fh = logging.FileHandler(os.path.join(exp_dir, "train.log"))
        except OSError as e:
            raise PCLError(f"--exp-dir {exp_dir} is not writable ({e.strerror})") from None
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class RunLog:
    """JSON lines in EXP_DIR/log.txt plus TensorBoard scalars under EXP_DIR/tb (rank 0 only)."""

    def __init__(self, exp_dir: str, tensorboard: bool = True) -> None:
        self.active = dist_utils.is_main()
        self.path = os.path.join(exp_dir, "log.txt")
        self.writer = None
        if self.active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(exp_dir, "tb"))
            except ImportError:
                logging.getLogger("pcl").warning("tensorboard is not installed: no TensorBoard logs")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().cpu() if hasattr(values, "detach") else values, step)

    def image(self, tag: str, image, step: int) -> None:
        """uint8 3 x H x W."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def record(self, entry: dict[str, Any]) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class AverageMeter:
    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)
