"""Stopping a run on SIGTERM / SIGUSR1 (SLURM preemption, ``kill``) or a first Ctrl-C at a safe point, and telling
the launcher.

The training loop asks :class:`StopRequest` after every step, feature batch and k-means granularity; on a
request it saves and calls :func:`raise_preempted`, which leaves ``EXP_DIR/PREEMPTED`` for the launch scripts
(they requeue) and for the official launcher's parent process (:func:`preempted_from_marker`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from typing import Any

import torch

from pcl import Preempted, checkpoint as ckpt_io, distributed as dist_utils

logger = logging.getLogger("pcl")

MARKER = "PREEMPTED"


class Stopped(Exception):
    """A stop request (agreed over ranks) ended the E-step or an M-step epoch early, on every rank alike. Raised
    where the work stops; :class:`pcl.resume.Session` catches it, saves and raises :class:`pcl.Preempted`.
    ``step``: batches of the epoch done (0: stopped at the epoch's start, in its E-step); ``state``: this rank's
    loop state to continue from (``step`` > 0)."""

    def __init__(self, step: int = 0, state: dict[str, Any] | None = None) -> None:
        super().__init__(f"stopped at step {step}")
        self.step, self.state = step, state


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption) and a first Ctrl-C (SIGINT) set a flag; the training loop finishes its
    step, saves, and stops. A second Ctrl-C (a second or more later) aborts at once without saving.

    ``requested`` is agreed over ranks (a one-element all-reduce), so every rank stops at the same step.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
    ABORT_AFTER = 1.0  # seconds: a second Ctrl-C this much later aborts; sooner it is the same press (torchrun
    # forwards the terminal's SIGINT to workers that got it from the terminal already)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._flag: torch.Tensor | None = None  # poll(): this step's flag, its host copy and the copy's event
        self._host: torch.Tensor | None = None
        self._event: Any = None
        self._first_interrupt: float | None = None
        self.after_training = False  # set once the last checkpoint is saved: a signal then has nothing to save

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":  # Ctrl-C: the first saves as SIGTERM does, a second one aborts
            now = time.monotonic()
            if self._first_interrupt is not None and now - self._first_interrupt >= self.ABORT_AFTER:
                raise KeyboardInterrupt
            if self._first_interrupt is not None:
                return
            self._first_interrupt = now
        self.signal_name = self.signal_name or name
        if self.after_training:
            logger.warning("%s received after the last checkpoint was saved: nothing is lost; the final report "
                           "finishes, then the run exits%s", name,
                           "; press Ctrl-C again to abort it" if name == "SIGINT" else "")
            return
        logger.warning("%s received: stopping at the next safe point (after this step, feature batch or "
                       "k-means iteration), then saving%s", name,
                       "; press Ctrl-C again to abort without saving" if name == "SIGINT" else "")

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced, except after a stop: then a further SIGTERM/SIGUSR1 (SLURM
        signals every task, schedulers repeat the signal) is logged and ignored where it would have killed the
        process, which is about to exit 75 with its checkpoint saved (a kill now would make that 143)."""
        for sig, handler in self._previous.items():
            late = self.signal_name is not None and handler == signal.SIG_DFL and sig != signal.SIGINT
            signal.signal(sig, _after_the_stop if late else handler)
        self._previous.clear()

    def requested(self, device: torch.device) -> bool:
        if not dist_utils.is_dist():
            return self.signal_name is not None
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(dist_utils.all_reduce_sum(flag).item() > 0)

    def poll(self, device: torch.device) -> bool:
        """:meth:`requested` for a loop that polls at every step, without stalling a CUDA device: the flag is
        reduced on the device and copied to pinned memory asynchronously, and each call returns the agreed flag
        of the previous call (waiting only for that one's copy, not for the work queued since). So a stop is
        seen one step later, at the same step on every rank. Off CUDA, or with one process, it is
        :meth:`requested` (one process: a Python flag; gloo: a synchronous one-element all-reduce)."""
        if device.type != "cuda" or not dist_utils.is_dist():
            return self.requested(device)
        if self._flag is None:
            self._flag = torch.zeros(1, device=device)
            self._host = torch.zeros(1, pin_memory=True)
        seen = False
        if self._event is not None:
            self._event.synchronize()
            seen = bool(self._host[0] > 0)
        self._flag.fill_(1.0 if self.signal_name else 0.0)  # a kernel, not a host-to-device copy
        dist_utils.all_reduce_sum(self._flag)
        self._host.copy_(self._flag, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return seen

    @property
    def name(self) -> str:
        return self.signal_name or "signal on another rank"


def _after_the_stop(signum: int, frame: Any) -> None:
    logger.warning("%s received after the stop: ignored, the run has saved and exits 75", signal.Signals(signum).name)


def raise_preempted(exp_dir: str, path: str, epoch: int, step: int, signal_name: str) -> None:
    """All ranks stop together; rank 0 leaves EXP_DIR/PREEMPTED for the launch scripts (they requeue)."""
    err = Preempted(path, epoch, step, signal_name)
    if dist_utils.is_main():
        try:  # the checkpoint is saved: a full disk here must not keep the other ranks waiting at the barrier
            with open(os.path.join(exp_dir, MARKER), "w", encoding="utf-8") as f:
                f.write(str(err) + "\n")
        except OSError as e:
            logger.warning("could not write %s (%s): the launch scripts will not requeue", MARKER, e.strerror)
    dist_utils.barrier()
    raise err


def clear_marker(exp_dir: str) -> None:
    """A run that starts continues the preempted one: its marker goes (rank 0)."""
    marker = os.path.join(exp_dir, MARKER)
    if dist_utils.is_main() and os.path.exists(marker):
        os.remove(marker)


def preempted_from_marker(exp_dir: str) -> Preempted:
    """The workers' Preempted, rebuilt in the launcher from the PREEMPTED file rank 0 wrote (epoch, step, path)."""
    marker = os.path.join(exp_dir, MARKER)
    try:
        with open(marker, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:  # gone, or unreadable: the generic Preempted below
        text = ""
    m = re.search(r"(\S+) received: stopped after epoch (\d+) step (\d+) and saved (.+?); rerun", text)
    if m is None:
        return Preempted(ckpt_io.preempt_path(exp_dir), -1, -1, "preemption signal")
    return Preempted(m.group(4), int(m.group(2)), int(m.group(3)), m.group(1))
