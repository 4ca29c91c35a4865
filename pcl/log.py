"""Console logging, JSON-lines log and TensorBoard, all written by rank 0 only (no print patching)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import torch

from pcl import PCLError, distributed as dist_utils


def process_rank(hint: int | None = None) -> int:
    """This process's global rank, also before the process group exists: the group's, else ``hint`` (what the
    spawn launcher assigned), else torchrun's RANK (trusted only with its WORLD_SIZE: a stray RANK alone would make
    the process a silent rank > 0 with no train.log and no lock; see :func:`pcl.distributed.stray_rank`), else 0."""
    if dist_utils.is_dist():
        return dist_utils.rank()
    if hint is not None:
        return max(hint, 0)
    if "RANK" in os.environ and dist_utils.stray_rank() is None:
        return int(os.environ["RANK"])
    return 0


def reason(err: BaseException) -> str:
    """'No space left on device' for an OSError, else the error's first line."""
    return getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def write_atomic(path: str, write_fn: Callable[[Any], None], binary: bool = False) -> None:
    """Call ``write_fn(f)`` on a temp file in ``path``'s folder, then rename it over ``path``: a full disk leaves
    the old file (or none) and no temp file, and is one PCLError 'could not write PATH (No space left on device)'."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp_{os.path.basename(path)}.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write_fn(f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise PCLError(f"could not write {path} ({reason(e)})") from None


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=1))


RUN_CONFIG = "config.yaml"


def write_run_config(exp_dir: str, settings: dict[str, Any]) -> str:
    """EXP_DIR/config.yaml: the run's resolved settings (:func:`pcl.config.resolved_settings`), which ``-c`` reads
    back: ``python main_pcl.py -c EXP_DIR/config.yaml --exp-dir NEW`` reruns the run. Atomic; returns the path."""
    import yaml

    path = os.path.join(exp_dir, RUN_CONFIG)
    head = (f"# The resolved settings of the run in {exp_dir}, written at its start ({versions()}).\n"
            f"# Rerun it: python main_pcl.py -c {path} --exp-dir NEW_DIR (the command line wins over this file)\n")
    write_atomic(path, lambda f: f.write(head + yaml.safe_dump(settings, sort_keys=False, default_flow_style=None)))
    return path


def git_commit(folder: str) -> str | None:
    """The commit checked out at ``folder`` ('+ changes' when tracked files differ from it); None when ``folder`` is
    not the top of a git checkout (an installed copy inside some other repository is not this code's commit) or
    there is no git."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", folder, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        if os.path.realpath(run("rev-parse", "--show-toplevel")) != os.path.realpath(folder):
            return None
        commit = run("rev-parse", "--short=12", "HEAD")
        return commit + (" + changes" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> str:
    """What a result depends on beyond the settings, in one line: Python, torch, torchvision, faiss and whether it
    can use GPUs, the CUDA torch was built with and the GPUs visible (counted without creating a CUDA context),
    and the commit of this code when it runs from a git checkout."""
    import torchvision

    try:
        import faiss

        gpu = hasattr(faiss, "StandardGpuResources")
        found = f"faiss {getattr(faiss, '__version__', '?')} ({'GPU build' if gpu else 'CPU only'})"
    except ImportError:
        found = "no faiss (k-means: PyTorch)"
    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPUs visible" if torch.version.cuda
            else "CPU build of torch")
    commit = git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return ", ".join([f"python {platform.python_version()}", f"torch {torch.__version__}",
                      f"torchvision {torchvision.__version__}", found, cuda,
                      f"commit {commit}" if commit else "not a git checkout"])


class OneLineFileHandler(logging.FileHandler):
    """train.log: a failed write (full disk) is one line on stderr the first time, then silence, where logging's
    default prints a '--- Logging error ---' traceback for every record; the console keeps the log."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            sys.stderr.write(f"could not write {self.baseFilename} ({reason(sys.exc_info()[1])}): the log goes "
                             f"to the console only\n")


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
    stray = dist_utils.stray_rank() if not dist_utils.is_dist() else None
    if stray:
        logger.warning("%s: ignored, this process runs as rank %d (unset RANK, or launch with torchrun)", stray, rank)
    if exp_dir and rank == 0:
        from pcl import PCLError

        shown = os.fsencode(exp_dir).decode("utf-8", "backslashreplace")
        try:
            exp_dir.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8: TensorBoard and the JSON logs cannot name its files
            raise PCLError(f"--exp-dir {shown}: its name has bytes that are not UTF-8 text; give a folder name in "
                           f"UTF-8") from None
        if os.path.islink(exp_dir) and not os.path.exists(exp_dir):
            raise PCLError(f"--exp-dir {shown} is a symbolic link to {os.readlink(exp_dir)}, which does not exist (or "
                           f"the link loops): create the folder it points to, or give another --exp-dir")
        if os.path.exists(exp_dir) and not os.path.isdir(exp_dir):
            raise PCLError(f"--exp-dir {exp_dir} is a file, not a folder")
        try:
            os.makedirs(exp_dir, exist_ok=True)
            fh = OneLineFileHandler(os.path.join(exp_dir, "train.log"), encoding="utf-8", errors="backslashreplace")
        except OSError as e:
            raise PCLError(f"--exp-dir {exp_dir} is not writable ({e.strerror})") from None
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def open_wandb(exp_dir: str, project: str, run_id: str | None, config: dict[str, Any]) -> Any:
    """A W&B run for this experiment folder (files under EXP_DIR/wandb): run ``run_id`` continued when given (the id
    a resumed checkpoint stores), else a new one. Offline mode, the entity, the API key come from W&B's own
    environment (WANDB_MODE=offline logs without a server; ``wandb sync`` uploads later)."""
    try:
        import wandb
    except ImportError:
        raise PCLError("--wandb needs the wandb package: pip install wandb (or pip install -e \".[wandb]\")") from None
    try:
        return wandb.init(project=project, id=run_id, resume="allow", dir=exp_dir, config=config,
                          name=os.path.basename(os.path.abspath(exp_dir)))
    except Exception as e:  # noqa: BLE001  (no login, no network: wandb raises its own types)
        raise PCLError(f"--wandb: W&B could not start a run ({reason(e)}); log in (wandb login), or set "
                       f"WANDB_MODE=offline to log without a server") from None


class RunLog:
    """JSON lines in EXP_DIR/log.txt plus the sinks of the same scalars, histograms, images and text: TensorBoard
    under EXP_DIR/tb and, with ``wandb``, a W&B run (rank 0 only). A full disk, or a W&B failure, is one warning
    each and never stops the run: the checkpoint, saved before, is what matters."""

    def __init__(self, exp_dir: str, tensorboard: bool = True, purge_step: int | None = None,
                 wandb: dict[str, Any] | None = None) -> None:
        """``purge_step``: a resumed run's first epoch; TensorBoard hides the earlier run's events from there on,
        so the resumed run continues one curve instead of drawing a second one over it. ``wandb``: the keyword
        arguments of :func:`open_wandb` but ``exp_dir`` (project, run_id, config); ``wandb_id`` is then the run's id,
        which the checkpoints store so that a resumed run logs into the same W&B run."""
        self.active = dist_utils.is_main()
        self.path = os.path.join(exp_dir, "log.txt")
        self.tb_dir = os.path.join(exp_dir, "tb")
        self.writer, self.record_failed, self.wandb = None, False, None
        self.wandb_id = (wandb or {}).get("run_id")
        if self.active and wandb is not None:
            self.wandb = open_wandb(exp_dir, **wandb)
            self.wandb_id = self.wandb.id
        if self.active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.tb_dir, purge_step=purge_step)
            except ImportError:
                logging.getLogger("pcl").warning("tensorboard is not installed: no TensorBoard logs")
            except OSError as e:
                self._tensorboard_failed(e)
        self.thread_error: OSError | None = None  # what killed the writer's thread (a full disk), said at once
        self._hook = None
        if self.writer is not None:  # the writer's thread would print its OSError as a traceback, mid-line
            self._hook, threading.excepthook = threading.excepthook, self._writer_thread_died

    def _writer_thread_died(self, args: Any) -> None:
        """threading.excepthook while this log's TensorBoard writer lives: its thread's OSError is one warning,
        the moment it happens; anything else goes to the previous hook."""
        ours = type(args.thread).__name__ == "_AsyncWriterThread"  # tensorboard's event-file writer thread
        if ours and isinstance(args.exc_value, OSError) and self.writer is not None and self.thread_error is None:
            self.thread_error = args.exc_value
            logging.getLogger("pcl").warning("could not write %s (%s): TensorBoard is off for this run",
                                             self.tb_dir, reason(args.exc_value))
        elif not ours or self.thread_error is None:
            (self._hook or threading.__excepthook__)(args)

    def _tensorboard_failed(self, err: OSError, said: bool = False) -> None:
        writer, self.writer = self.writer, None
        if not said:
            logging.getLogger("pcl").warning("could not write %s (%s): TensorBoard is off for this run", self.tb_dir,
                                             reason(err))
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    def _tb(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.writer is not None and self.thread_error is not None:  # said by the hook already
            self._tensorboard_failed(self.thread_error, said=True)
        if self.writer is not None:
            try:
                getattr(self.writer, method)(*args, **kwargs)
            except OSError as e:
                self._tensorboard_failed(e)

    def _wandb(self, step: int, make: Callable[[Any], dict[str, Any]]) -> None:
        """Log ``make(wandb)`` at ``step`` (the epoch) to the W&B run; its first failure turns W&B off, one warning."""
        if self.wandb is None:
            return
        try:
            import wandb

            self.wandb.log(make(wandb), step=step)
        except Exception as e:  # noqa: BLE001  (a network or disk error inside wandb must not stop the run)
            self.wandb = None
            logging.getLogger("pcl").warning("W&B logging failed (%s): W&B is off for the rest of this run", reason(e))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._tb("add_scalar", key, value, step)
        self._wandb(step, lambda wandb: dict(values))

    def histogram(self, tag: str, values, step: int) -> None:
        values = values.detach().cpu() if hasattr(values, "detach") else values
        self._tb("add_histogram", tag, values, step)
        self._wandb(step, lambda wandb: {tag: wandb.Histogram(torch.as_tensor(values).float().numpy())})

    def image(self, tag: str, image, step: int) -> None:
        """uint8 3 x H x W."""
        self._tb("add_image", tag, image, step, dataformats="CHW")
        self._wandb(step, lambda wandb: {tag: wandb.Image(torch.as_tensor(image).permute(1, 2, 0).cpu().numpy())})

    def text(self, tag: str, text: str, step: int) -> None:
        import html

        self._tb("add_text", tag, text, step)
        self._wandb(step, lambda wandb: {f"{tag}_text": wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def record(self, entry: dict[str, Any]) -> None:
        """Append one JSON line; on a full disk the partial line is cut off again and the first failure warns."""
        if not self.active:
            return
        try:
            with open(self.path, "ab", buffering=0) as f:  # unbuffered: nothing is left to flush on close
                start = f.tell()
                try:
                    f.write((json.dumps(entry) + "\n").encode())
                except OSError:
                    with contextlib.suppress(OSError):
                        f.truncate(start)
                    raise
        except OSError as e:
            if not self.record_failed:
                logging.getLogger("pcl").warning("could not write %s (%s): epoch stats go to the console/"
                                                 "TensorBoard only", self.path, reason(e))
            self.record_failed = True

    def close(self) -> None:
        self._tb("close")
        if self._hook is not None and threading.excepthook == self._writer_thread_died:
            threading.excepthook = self._hook
        self._hook = None
        if self.wandb is not None:
            with contextlib.suppress(Exception):
                self.wandb.finish()
            self.wandb = None


class AverageMeter:
    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


class StepMeters:
    """Running weighted sums of a training step's scalars, kept on the device: updating them costs no host sync
    (a GPU step that reads ``loss.item()`` waits for its own kernels and stops the host from queueing the next
    step). Read them every --print-freq steps and at the epoch's end: one sync for all. Sums are float64, as the
    host-side AverageMeter's, so the averages are the same numbers."""

    def __init__(self, device: Any, names: tuple[str, ...] = ()) -> None:
        """``names``: meters that come first in the logs (in this order), whether or not they are updated."""
        self.device = device
        self.sums: dict[str, Any] = dict.fromkeys(names, 0.0)
        self.counts: dict[str, int] = dict.fromkeys(names, 0)

    def update(self, name: str, value: Any, n: int = 1) -> None:
        """Add ``value`` (a 0-dim tensor on the device, or a number) with weight ``n``."""
        value = value.detach().to(torch.float64) if torch.is_tensor(value) else float(value)
        self.sums[name] = self.sums[name] + value * n if name in self.sums else value * n
        self.counts[name] = self.counts.get(name, 0) + n

    def state(self) -> dict[str, list[float]]:
        """{name: [sum, count]} as plain floats (one host sync), as checkpoints store the meters."""
        names = list(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[n], dtype=torch.float64, device=self.device)
                              for n in names]).tolist() if names else []
        return {n: [v, self.counts[n]] for n, v in zip(names, values)}

    def load(self, state: dict[str, list[float]]) -> None:
        for name, (total, count) in state.items():
            self.sums[name], self.counts[name] = float(total), int(count)

    def averages(self) -> dict[str, float]:
        return {n: total / max(count, 1) for n, (total, count) in self.state().items() if count}


class FiniteGuard:
    """Watches every step's loss on the device (no host sync) and stops the run at the next check when one was
    NaN/inf: every --print-freq steps, at the epoch's end and before any save, agreed over ranks (one
    all-reduce), so that every rank raises the same error at the same step and nothing is saved."""

    def __init__(self, device: Any) -> None:
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first = torch.zeros(4, dtype=torch.float64, device=device)  # step, loss_inst, loss_proto, lr

    def watch(self, step: int, loss: Any, loss_inst: Any, loss_proto: Any, lr: float) -> None:
        """Record this step's total loss (0-dim tensors; ``loss_proto`` None before the first E-step)."""
        now = ~torch.isfinite(loss.detach())
        full = lambda v: torch.full((), v, dtype=torch.float64, device=loss.device)  # noqa: E731  (a kernel, no copy)
        values = torch.stack([full(float(step)), loss_inst.detach().double(),
                              loss_proto.detach().double() if loss_proto is not None else full(0.0), full(lr)])
        self.first = torch.where(now & ~self.bad, values, self.first)
        self.bad |= now

    def check(self, epoch: int, step: int, proto: bool) -> None:
        """Raise a PCLError on every rank (at the same ``step``) when any rank saw a non-finite loss."""
        flag = dist_utils.all_reduce_sum(self.bad.to(torch.float32).reshape(1))
        if float(flag) == 0:
            return
        kept = "nothing of this epoch is saved"
        if not bool(self.bad):
            raise PCLError(f"non-finite loss on another rank by epoch {epoch} step {step} (its log has the values); "
                           f"lower --lr ({kept})")
        first, inst, loss_proto, lr = self.first.tolist()
        # both terms finite, their weighted sum not: the weight overflowed it, not the updates
        fix = "lower --proto-weight" if proto and math.isfinite(inst) and math.isfinite(loss_proto) else "lower --lr"
        raise PCLError(f"non-finite loss at epoch {epoch} step {int(first)}: loss_inst={inst:.4g}"
                       + (f" loss_proto={loss_proto:.4g}" if proto else "")
                       + f" lr={lr:.4g}; {fix} ({kept})")


class InputClock:
    """How long the training loop waited for its batches: the host's time inside the loader's ``next`` (no device
    sync). When loader workers keep up, batches are ready and the wait is near zero; a large share of the epoch
    spent waiting means the input pipeline, not the model, bounds the run."""

    def __init__(self) -> None:
        self.wait, self.start, self.end, self.batches = 0.0, time.perf_counter(), None, 0

    def timed(self, loader: Any) -> Any:
        """``loader``'s batches, each one's wait added up; the clock stops when the loader is exhausted."""
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.end = time.perf_counter()
                return
            self.wait += time.perf_counter() - t
            self.batches += 1
            yield batch

    def stats(self) -> dict[str, float]:
        """``input_wait``: the share of the M-step's wall time spent waiting for batches (0-1)."""
        total = (self.end or time.perf_counter()) - self.start
        return {"input_wait": self.wait / total if total > 0 else 0.0}
