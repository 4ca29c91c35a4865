"""The only module that reads or writes checkpoints.

Layout (official PCL/MoCo): ``{'epoch', 'arch', 'state_dict', 'optimizer', ...}`` with state_dict keys
``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue``, ``module.queue_ptr``. Everything is
tensors and plain Python types, loaded with ``torch.load(weights_only=True)``; writes are atomic.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
import torch.nn as nn

from pcl import PCLError
from pcl.model import DIVERGED, build_backbone, unwrap

logger = logging.getLogger(__name__)

LAST = "checkpoint_last.pth.tar"


def checkpoint_path(exp_dir: str, epoch: int) -> str:
    """The official file name: ``checkpoint_{epoch:04d}.pth.tar`` with the 0-based index of the epoch
    just trained (the file holds ``'epoch': epoch + 1``, the epoch to resume at)."""
    return os.path.join(exp_dir, f"checkpoint_{epoch:04d}.pth.tar")


def preempt_path(exp_dir: str) -> str:
    """Where a mid-epoch (SIGTERM/SIGUSR1) checkpoint goes; ``--resume auto`` takes it when its (epoch, step) is
    the highest."""
    return os.path.join(exp_dir, "checkpoint_preempt.pth.tar")


def checkpoint_files(exp_dir: str) -> list[str]:
    """The paths of the ``checkpoint_*.pth.tar`` entries in ``exp_dir`` (files, links and anything else of that
    name), sorted; [] when there is no such folder."""
    if not os.path.isdir(exp_dir):
        return []
    return sorted(os.path.join(exp_dir, n) for n in os.listdir(exp_dir)
                  if n.startswith("checkpoint_") and n.endswith(".pth.tar"))


def read_header(path: str) -> dict[str, Any]:
    """A checkpoint's contents with every tensor memory-mapped, not read (``torch.load(mmap=True)``: only its
    pickle, a few kB, comes off the disk): what ``--resume auto`` ranks the files by (epoch, step, run_id) for
    milliseconds each instead of a full load. Files of torch's legacy (non-zip) format are loaded in full. Raises
    PCLError as :func:`load_checkpoint` does (a truncated file loses the zip directory at its end)."""
    return load_checkpoint(path, "cpu", mmap=True)


def read_headers(exp_dir: str, quiet: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(path, header) of every readable checkpoint file in ``exp_dir``, newest file first; a dangling link or an
    unreadable (truncated) file is skipped with a warning (none: ``quiet``)."""
    found = []
    warn = (lambda *a: None) if quiet else logger.warning
    for path in checkpoint_files(exp_dir):
        if not os.path.exists(path):  # a symlink whose target is gone
            warn("--resume auto: skipping %s (a link to a file that no longer exists)", path)
            continue
        if os.path.isdir(path):
            continue  # refused by name where a run would save over it (pcl.resume.claim_exp_dir)
        try:
            found.append((path, read_header(path)))
        except PCLError as e:
            warn("--resume auto: skipping %s (%s)", path, e)
    # newest file first, so that of equal (epoch, step) the newest wins; the mtime alone lies after cp -r or touch
    return sorted(found, key=lambda item: os.path.getmtime(item[0]), reverse=True)


def resolve_resume(resume: str, exp_dir: str) -> tuple[str | None, dict[str, Any] | None]:
    """``--resume PATH`` -> (PATH, its header). ``--resume auto`` -> the readable ``checkpoint_*.pth.tar`` in
    ``exp_dir`` with the highest (epoch, step) stored in it, of equal ones the newest (a truncated or unreadable one
    is skipped with a warning), and its header; (None, None) when there is none: a fresh start. Only the headers
    are read (:func:`read_header`: tensors memory-mapped); :func:`load_checkpoint` reads the chosen file."""
    if resume != "auto":
        return resume, read_header(resume)
    best: tuple[tuple[int, int], str, dict[str, Any]] | None = None
    for path, head in read_headers(exp_dir):
        if "state_dict" in head and "epoch" in head and (best is None or progress(head) > best[0]):
            best = (progress(head), path, head)
    if best is None:
        logger.info("--resume auto: no readable checkpoint in %s, starting from scratch", exp_dir)
        return None, None
    logger.info("--resume auto: chose %s, the highest epoch of the readable checkpoints (epoch %d, step %d)",
                best[1], *best[0])
    return best[1], best[2]


def progress(ckpt: dict[str, Any]) -> tuple[int, int]:
    """(epoch, step) a checkpoint resumes at: a mid-epoch one holds (e, s > 0), the next epoch-boundary (e + 1, 0)."""
    epoch, step = ckpt.get("epoch"), ckpt.get("step") or 0
    number = lambda v: v if isinstance(v, int) and not isinstance(v, bool) else -1  # noqa: E731
    return number(epoch), max(number(step), 0)


def save_checkpoint(state: dict[str, Any], path: str, last: str | None = LAST) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename) and point
    ``last`` (default ``checkpoint_last.pth.tar``; None: no link) at it. A crash or full disk mid-write
    leaves the previous files intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_ckpt_")
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):  # mkstemp makes 0600: checkpoints get the umask like any other file
        os.fchmod(fd, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if last is None or os.path.basename(path) == last:
            return
        last_tmp = os.path.join(folder, ".tmp_" + last)
        try:
            if os.path.exists(last_tmp):
                os.remove(last_tmp)
            os.link(path, last_tmp)
        except OSError:
            shutil.copyfile(path, last_tmp)
        os.replace(last_tmp, os.path.join(folder, last))
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # a full disk inside torch.save is a RuntimeError of its zip writer ("[enforce fail at inline_container
        # ...] file write failed"), not an OSError
        if isinstance(e, RuntimeError) and not any(w in str(e).lower() for w in ("write", "inline_container")):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PCLError(f"could not save checkpoint {path}: {first} (disk full? the previous checkpoint is "
                       f"intact)") from None


TEMP_PREFIXES = (".tmp_ckpt_", ".tmp_" + LAST)


def remove_stale_temps(folder: str) -> list[str]:
    """Delete the temp files of saves that crashed (kill -9, full disk) in ``folder``; call it while holding
    the folder's :class:`ExpDirLock`, so that no live save is touched. Returns the removed names."""
    if not os.path.isdir(folder):
        return []
    stale = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIXES)]
    for name in stale:
        os.remove(os.path.join(folder, name))
    if stale:
        logger.warning("removed %d temp files of earlier crashed saves in %s", len(stale), folder)
    return stale


class ExpDirLock:
    """An exclusive lock on an experiment folder for one run (flock on EXP_DIR/.lock, released by the OS when
    the process dies): a second run in the same folder is refused instead of overwriting its checkpoints. On a
    filesystem without flock (Lustre/NFS mounted without it) the run goes on unlocked, with one warning."""

    def __init__(self, folder: str) -> None:
        self.folder, self.file, self.locked = folder, None, False

    def __enter__(self) -> "ExpDirLock":
        import errno
        import fcntl
        import socket
        import time

        if os.path.isdir(os.path.join(self.folder, ".lock")):
            raise PCLError(f"--exp-dir {self.folder}: .lock is a directory, not the run's lock file; remove it (a "
                           f"run keeps its lock file there)")
        try:  # a file in its place was refused by setup_logging, which every entry point calls first
            os.makedirs(self.folder, exist_ok=True)
            self.file = open(os.path.join(self.folder, ".lock"), "a+")
        except OSError as e:
            raise PCLError(f"--exp-dir {self.folder} is not writable ({e.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.locked = True
        except OSError as e:
            if self._busy(e):
                self.file.seek(0)
                owner = self.file.read().strip() or "another process"
                self.file.close()
                self.file = None
                raise PCLError(f"--exp-dir {self.folder} is in use by another run ({owner}): give another "
                               f"--exp-dir, or stop that run first") from None
            # the filesystem cannot lock at all (Lustre/NFS without flock: ENOSYS, EOPNOTSUPP, ENOLCK, EINVAL)
            logger.warning("--exp-dir %s: the filesystem does not support file locks (flock failed with %s): "
                           "running without the lock, so there is no protection against a second run in this "
                           "folder", self.folder, errno.errorcode.get(e.errno, f"errno {e.errno}"))
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            self.file.flush()
        except OSError as e:  # a full disk (ENOSPC), a quota: nothing could be saved there either
            with contextlib.suppress(OSError):
                self.file.close()  # closes the file (and releases the lock) even when its flush fails again
            self.file, self.locked = None, False
            raise PCLError(f"--exp-dir {self.folder}: could not write its lock file .lock ({e.strerror or e}): free "
                           f"space there (no checkpoint could be saved either) or give another --exp-dir") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()  # releases the flock (when there was one)
            self.file, self.locked = None, False

    @staticmethod
    def _busy(e: OSError) -> bool:
        """Whether a failed non-blocking flock means another holder: "would block" (EWOULDBLOCK/EAGAIN), or
        EACCES which some systems return instead; any other errno means the filesystem cannot lock at all."""
        import errno

        return isinstance(e, BlockingIOError) or e.errno in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load with ``weights_only=True``; a missing, truncated or pickle-requiring file raises PCLError. ``mmap``:
    tensors memory-mapped from the file, read when used (see :func:`read_header`)."""
    if os.path.isdir(path):
        raise PCLError(f"checkpoint {path} is a directory: give a checkpoint file in it (e.g. {path}/checkpoint_last"
                       f".pth.tar), or --resume auto with --exp-dir {path}")
    if not os.path.isfile(path):
        raise PCLError(f"checkpoint not found: {path}")
    try:
        kind = _sniff(path)
        if kind is None:
            ckpt = _torch_load(path, map_location, mmap and head_is_zip(path))
    except OSError as e:  # unreadable (permission denied, an I/O error): one line naming the file and the cause
        raise PCLError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # torch raises many types for garbage: name the file and the cause instead
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Weights only load failed" in str(e):
            raise PCLError(f"refusing to load {path}: it needs arbitrary Python objects to unpickle, which "
                           f"could run code; re-save it with tensors and plain types only ({first[:200]})") from None
        raise PCLError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {first[:200]})") from None
    if kind is not None:
        raise PCLError(f"{path} is not a PyTorch checkpoint: {kind}")
    if not isinstance(ckpt, dict):
        raise PCLError(f"checkpoint {path} is not a dict of tensors")
    return ckpt


def _torch_load(path: str, map_location: str | torch.device, mmap: bool) -> Any:
    if mmap:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(path, map_location=map_location, weights_only=True)


def head_is_zip(path: str) -> bool:
    """torch.save's zip format (the only one torch.load can memory-map), not the legacy pickle stream."""
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def _sniff(path: str) -> str | None:
    """What a file that cannot be a torch.save checkpoint is (None: it may be one). torch.save writes a zip
    archive (PK..) or, with the legacy format, a pickle (0x80 protocol byte)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed (decompress it first, e.g. gunzip)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        return "it is an HTML/XML page (a failed download?)"
    if text.startswith((b"{", b"[")):
        return "it is JSON text"
    return f"it starts with bytes {head[:8].hex()} (a torch.save file starts with PK or 0x80)"


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict in the official layout (``module.`` prefix whether DDP-wrapped or not)."""
    inner = unwrap(model)
    return {"module." + k: v for k, v in inner.state_dict().items()}


def checkpoint_state(model: nn.Module, epoch: int, arch: str, optimizer: torch.optim.Optimizer | None = None,
                     model_config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict in the official layout: ``epoch`` (the epoch to resume at), ``arch``, ``state_dict``
    (``module.*`` keys), ``optimizer`` (when given), then ``model_config`` (what rebuilds the backbone: width,
    stem, ...) and the caller's ``extra`` keys. Every writer of a checkpoint builds it here."""
    state: dict[str, Any] = {"epoch": epoch, "arch": arch, "state_dict": model_state(model)}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    state["model_config"] = dict(model_config or {})
    state.update(extra)
    return state


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """'pretrain' (ours or official PCL/MoCo: encoder_q, encoder_k and queue), 'linear' (eval_linear.py's),
    'weights' (a bare state_dict, e.g. torchvision's or an export) or 'unknown'."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        return "weights" if ckpt and all(torch.is_tensor(v) for v in ckpt.values()) else "unknown"
    keys = strip_prefix(state, "module.")
    if any(k.startswith("encoder_k.") for k in keys) and "queue" in keys:
        return "pretrain"
    if "best_acc1" in ckpt or "num_classes" in ckpt:
        return "linear"
    return "unknown"


def check_cluster_result(state: Any, source: str) -> None:
    """A checkpoint's ``cluster_result`` (the E-step's prototypes: per granularity im2cluster N, centroids k x d,
    density k), its shapes checked without reading the tensors' data: one line naming what is wrong."""
    def bad(why: str) -> PCLError:
        return PCLError(f"checkpoint {source}: its cluster_result {why}; the file is damaged or hand-made")

    if not isinstance(state, dict) or not all(isinstance(state.get(k), (list, tuple)) for k in
                                              ("im2cluster", "centroids", "density")):
        raise bad("is not a mapping of im2cluster, centroids and density lists")
    assign, cents, phi = state["im2cluster"], state["centroids"], state["density"]
    if not assign or not len(assign) == len(cents) == len(phi):
        raise bad(f"holds {len(assign)} / {len(cents)} / {len(phi)} granularities (im2cluster / centroids / density)")
    for g, (a, c, p) in enumerate(zip(assign, cents, phi)):
        if not all(torch.is_tensor(t) for t in (a, c, p)) or a.dim() != 1 or c.dim() != 2 or p.dim() != 1 \
                or p.shape[0] != c.shape[0] or a.shape != assign[0].shape or a.is_floating_point():
            raise bad(f"granularity {g} has the wrong shapes (expected im2cluster N integers, centroids k x d, density "
                      f"k)")


def require_pretrain_checkpoint(ckpt: dict[str, Any], source: str) -> None:
    """--resume of pretraining takes a pretraining checkpoint; say what else a file is and which flag takes it."""
    kind = checkpoint_kind(ckpt)
    if kind == "pretrain":
        if not isinstance(ckpt.get("epoch"), int) or isinstance(ckpt.get("epoch"), bool) or ckpt["epoch"] < 0:
            raise PCLError(f"--resume {source}: its 'epoch' is {ckpt.get('epoch')!r}, not an epoch number")
        if "optimizer" in ckpt and not isinstance(ckpt["optimizer"], dict):
            raise PCLError(f"--resume {source}: its 'optimizer' is a {type(ckpt['optimizer']).__name__}, not an "
                           f"optimizer state")
        if ckpt.get("cluster_result") is not None:
            check_cluster_result(ckpt["cluster_result"], source)
        return
    what = {"linear": "a linear-probe checkpoint of eval_linear.py (resume it with eval_linear.py --resume)",
            "weights": "a bare weights file (a backbone: give it to the evaluation commands' --pretrained)",
            "unknown": "not a pretraining checkpoint (no module.encoder_q/encoder_k/queue in its state_dict)"}[kind]
    raise PCLError(f"--resume {source}: this is {what}; pretraining resumes from its own checkpoint_*.pth.tar "
                   f"or an official PCL/MoCo one")


def require_linear_checkpoint(ckpt: dict[str, Any], source: str) -> None:
    """eval_linear.py --resume takes a linear head it saved (or the official eval_cls_imagenet.py's): a state_dict
    with the backbone and ``fc``, an epoch number, an optimizer state (when there is one) of the head. Anything else
    is one line that says what the file is and which flag takes it."""
    kind = checkpoint_kind(ckpt)
    if kind == "pretrain":
        raise PCLError(f"--resume {source} is a pretraining checkpoint (encoder_q/encoder_k/queue), not a linear head: "
                       f"give it to --pretrained; --resume continues a head eval_linear.py saved "
                       f"(EXP_DIR/linear_checkpoint.pth.tar)")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise PCLError(f"--resume {source} has no 'state_dict' (it holds {', '.join(map(str, list(ckpt)[:6]))}): not "
                       f"a linear checkpoint of eval_linear.py")
    if not any(k.endswith("fc.weight") for k in state):
        raise PCLError(f"--resume {source} holds no linear head (no fc.weight in its state_dict): give a "
                       f"linear_checkpoint.pth.tar of eval_linear.py, or the file to --pretrained")
    epoch = ckpt.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise PCLError(f"--resume {source}: its 'epoch' is {epoch!r}, not an epoch number")
    if "optimizer" in ckpt and not isinstance(ckpt["optimizer"], dict):
        raise PCLError(f"--resume {source}: its 'optimizer' is a {type(ckpt['optimizer']).__name__}, not an optimizer "
                       f"state")


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    inner = unwrap(model)
    try:
        inner.load_state_dict(strip_prefix(state_dict, "module."), strict=True)
    except RuntimeError as e:
        raise PCLError(f"checkpoint {source} does not match the model (arch/--width/--stem/--mlp/--low-dim/"
                       f"--pcl-r): {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, Any],
                         source: str) -> None:
    """Load an optimizer state saved over all of the model's parameters (official, and ours since the official
    layout was adopted) or over only the trainable ones (ours before): the latter's indices are mapped to the
    trainable parameters' positions in ``model.parameters()``."""
    params = list(model.parameters())
    saved = [i for g in state.get("param_groups", []) for i in g.get("params", [])]
    current = sum(len(g["params"]) for g in optimizer.param_groups)
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    if len(saved) == len(trainable) != current and len(optimizer.param_groups) == len(state["param_groups"]) == 1:
        remap = dict(zip(saved, trainable))
        group = dict(state["param_groups"][0], params=list(range(len(params))))
        state = {"state": {remap[i]: v for i, v in state["state"].items()}, "param_groups": [group]}
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise PCLError(f"checkpoint {source}: its optimizer state does not fit this model ({e}); resume with "
                       f"the flags it was trained with, or load only the weights with --pretrained") from None


def backbone_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The query encoder's backbone weights: ``[module.]encoder_q.*`` minus the projection head ``fc``.
    A plain torchvision state_dict (no encoder_q keys) is taken as it is, minus ``fc``."""
    state = strip_prefix(state_dict, "module.")
    if any(k.startswith("encoder_q.") for k in state):
        state = {k[len("encoder_q."):]: v for k, v in state.items() if k.startswith("encoder_q.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


MODEL_CONFIG_TYPES = {"width": int, "stem": str, "low_dim": int, "mlp": bool}
_KIND_WORDS = {int: "an integer", str: "text", bool: "true or false"}


def model_config(ckpt: dict[str, Any], path: str) -> dict[str, Any]:
    """A checkpoint's ``model_config`` (what rebuilds its backbone: width, stem, low_dim, mlp), its shape checked:
    a mapping whose known keys have their types ({} when the file has none, as official ones)."""
    cfg = ckpt.get("model_config")
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise PCLError(f"checkpoint {path}: its 'model_config' is a {type(cfg).__name__}, not a mapping of width, "
                       f"stem, ...; the file is damaged or hand-made: re-save it, or drop the key")
    for key, kind in MODEL_CONFIG_TYPES.items():
        value = cfg.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise PCLError(f"checkpoint {path}: its model_config '{key}' is {value!r}, not {_KIND_WORDS[kind]}")
    return cfg


def load_backbone(path: str, arch: str | None = None, map_location: str | torch.device = "cpu",
                  width: int | None = None, stem: str | None = None) -> nn.Module:
    """The query backbone of a checkpoint of ours or of the official code (v1 or mlp v2): projection head
    dropped, returns pooled features B x d, in eval mode. ``arch``/``width``/``stem`` default to the
    checkpoint's (official checkpoints: torchvision width 64, standard stem); given ones must match it."""
    ckpt = load_checkpoint(path, map_location)
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise PCLError(f"checkpoint {path}: its state_dict is a {type(state).__name__} of the wrong shape, not a "
                       f"mapping of parameter names to tensors")
    cfg = model_config(ckpt, path)
    arch = arch or ckpt.get("arch")
    if arch is None:
        raise PCLError(f"checkpoint {path} does not name its architecture: pass arch (e.g. -a resnet50)")
    if not isinstance(arch, str):
        raise PCLError(f"checkpoint {path}: its 'arch' is {arch!r}, not an architecture name")
    width = width or cfg.get("width", 64)
    stem = stem or cfg.get("stem", "standard")
    backbone = build_backbone(arch, width, stem)
    weights = backbone_state(state)
    bad = [k for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()
           and not float(v.detach().abs().max()) < DIVERGED]  # NaN compares False: caught too
    if bad:
        raise PCLError(f"checkpoint {path} has NaN/inf or diverged (|w| >= {DIVERGED:.0e}) backbone weights in "
                       f"{len(bad)} tensors (first: {bad[0]}): the run that wrote it diverged; take an earlier "
                       f"checkpoint of it")
    if not set(weights) & set(backbone.state_dict()):
        raise PCLError(f"checkpoint {path} holds no backbone weights (no [module.]encoder_q.* keys)")
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:300]
        raise PCLError(f"checkpoint {path} does not fit architecture '{arch}' (width {width}, stem {stem}): {detail}; "
                       f"pass the -a/--width/--stem it was trained with") from None
    backbone.arch = arch
    return backbone.eval()


def query_backbone(model: nn.Module) -> nn.Module:
    """A copy of a live MoCo model's query backbone (head dropped) in eval mode."""
    inner = unwrap(model)
    backbone = copy.deepcopy(inner.encoder_q)
    backbone.fc = nn.Identity()
    return backbone.eval()


if __name__ == "__main__":  # the command line an earlier version forwarded to pcl.export: say where it went
    import sys

    print(f"error: pcl.checkpoint has no command line; export a backbone with: python -m pcl.export "
          f"{' '.join(a for a in sys.argv[1:] if a != 'export') or 'CKPT OUT'}", file=sys.stderr)
    sys.exit(2)
