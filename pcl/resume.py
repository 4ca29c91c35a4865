"""Where a run starts, what it saves, and how it stops: the loop state (RNG streams, loader position, meters)
captured and restored in one place, the checkpoints of the loop (periodic, the last epoch, on a stop request), and
the stop itself (SIGTERM / SIGUSR1 / a first Ctrl-C: the step finishes, a checkpoint is saved, every rank raises
:class:`pcl.Preempted`).

The loop talks to one :class:`Session`::

    session = Session.prepare(cfg)                 # --resume read and checked before the dataset is scanned
    if session.load(model, optimizer, data, device):   # False: nothing left to train
        with session:                              # stop handlers; a Stopped inside saves and raises Preempted
            for epoch in range(session.start_epoch, cfg.epochs):
                clusters = session.begin(epoch)     # seeds the epoch; mid-epoch: the checkpoint's prototypes
                ...
                state = session.epoch_state(epoch, clusters, loader, meters)
                ...
                session.save(epoch, clusters)
                session.stop_if_requested(epoch)
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from pcl import PCLError, checkpoint as ckpt_io, distributed as dist_utils
from pcl.cluster import ClusterResult
from pcl.data import PretrainData, stream_seed
from pcl.features import FeatureBank
from pcl.log import StepMeters
from pcl.model import check_weights
from pcl.preemption import MARKER, StopRequest, Stopped, clear_marker, raise_preempted
from pcl.settings import RunConfig

logger = logging.getLogger("pcl")


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct seed for each (run seed, epoch, rank, stream): resuming at an epoch replays it exactly
    (0: torch's global RNG, 1: shuffle-BN, 2: negative prototypes)."""
    return stream_seed(seed, epoch, dist_utils.rank(), stream)


@dataclass
class EpochState:
    """The loop state of one M-step epoch on this rank: where it starts, its RNG streams, its running meters and
    the stop request it polls. :meth:`capture` is what a mid-epoch checkpoint stores of it."""
    epoch: int
    start_step: int  # batches of the epoch already trained (a mid-epoch resume)
    device: torch.device
    shuffle: torch.Generator  # shuffle-BN permutations
    negatives: torch.Generator  # negative prototype draws
    meters: StepMeters
    stop: StopRequest | None = None

    @classmethod
    def start(cls, seed: int, epoch: int, device: torch.device, meters: tuple[str, ...],
              stop: StopRequest | None = None, restore: dict[str, Any] | None = None,
              start_step: int = 0) -> "EpochState":
        """A fresh epoch's state (the streams seeded from (seed, epoch, rank)), or with ``restore`` the one a
        mid-epoch checkpoint captured."""
        state = cls(epoch, start_step, device, torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch, 1)),
                    torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch, 2)), StepMeters(device, meters),
                    stop)
        if restore is not None:
            state.shuffle.set_state(restore["shuffle_gen"])
            state.negatives.set_state(restore["negative_gen"])
            state.meters.load(restore["meters"])
        return state

    def stop_requested(self) -> bool:
        """Agreed over ranks (see :meth:`StopRequest.poll`)."""
        return self.stop is not None and self.stop.poll(self.device)

    def capture(self, loader: Any) -> dict[str, Any]:
        """What continues this epoch exactly: both streams, the meters, the loader's position, torch's RNG."""
        return {"shuffle_gen": self.shuffle.get_state(), "negative_gen": self.negatives.get_state(),
                "meters": self.meters.state(), "loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}


def checkpoint_contents(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, cfg: RunConfig,
                        clusters: ClusterResult | None, step: int = 0,
                        resume_states: list[dict[str, Any]] | None = None,
                        scaler: torch.amp.GradScaler | None = None, bank: FeatureBank | None = None,
                        wandb_id: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Official keys (epoch = the epoch to resume at, arch, state_dict, optimizer) plus our settings and model
    config, the epoch's prototypes, the fp16 loss scale (``scaler``: --amp fp16), the E-step's bank (``bank``:
    --estep-features bank), the W&B run's id (``wandb_id``: --wandb), the ``run_id`` every checkpoint of one run
    shares (what tells a run folder's own files from another run's) and, for a mid-epoch (preemption) checkpoint,
    ``step`` and every rank's loop state. Tensors and plain types only."""
    extra: dict[str, Any] = {"step": step, "args": {**cfg.plain(), "global_batch_size": cfg.batch_size}}
    if run_id is not None:
        extra["run_id"] = run_id
    if scaler is not None:
        extra["scaler"] = scaler.state_dict()
    if wandb_id is not None:  # --wandb: a resumed run logs into the same W&B run
        extra["wandb_id"] = wandb_id
    if clusters is not None:
        extra["cluster_result"] = clusters.state_dict()
    if bank is not None:
        extra["estep_bank"] = bank.state_dict()
    if resume_states is not None:
        extra["resume_states"] = resume_states
    return ckpt_io.checkpoint_state(model, epoch + 1 if step == 0 else epoch, cfg.arch, optimizer,
                                    {"width": cfg.width, "stem": cfg.stem, "low_dim": cfg.low_dim, "mlp": cfg.mlp},
                                    **extra)


def load_into(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
              ckpt: dict[str, Any] | None = None, scaler: torch.amp.GradScaler | None = None,
              expect: tuple[int, int] | None = None) -> dict[str, Any]:
    """Load a pretraining checkpoint's weights, queue, optimiser state (its momentum buffers; the hyper-parameters
    stay the ones ``optimizer`` was built with) and (``scaler``, when the file has one) the fp16 loss scale; return
    its contents (epoch, step, cluster_result, resume_states). ``expect``: the (epoch, step) rank 0 read in it
    (another one here: the file changed between the two reads)."""
    ckpt = ckpt if ckpt is not None else ckpt_io.load_checkpoint(path, map_location=device)
    ckpt_io.require_pretrain_checkpoint(ckpt, path)
    if expect is not None and ckpt_io.progress(ckpt) != tuple(expect):
        raise PCLError(f"--resume {path} holds epoch {ckpt_io.progress(ckpt)[0]} step {ckpt_io.progress(ckpt)[1]} "
                       f"here, but epoch {expect[0]} step {expect[1]} on rank 0: the file changed as the run started "
                       f"(still being copied?); let it settle and start again")
    ckpt_io.load_model_state(model, ckpt["state_dict"], path)
    check_weights(model, "", source=path)  # NaN or 1e28 weights: the file's fault, not the lr's
    if ckpt.get("optimizer"):  # official files written without one hold {}
        # load_state_dict also brings back the saved momentum, weight decay and kernel; this run's flags set them
        # (the learning rate follows the schedule at every epoch): a resume with another --wd trains with it
        chosen = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                  for g in optimizer.param_groups]
        ckpt_io.load_optimizer_state(optimizer, model, ckpt["optimizer"], path)
        for group, settings in zip(optimizer.param_groups, chosen):
            group.update(settings)
    if scaler is not None and ckpt.get("scaler"):  # else it starts at GradScaler's initial scale, as a fresh run
        scaler.load_state_dict(ckpt["scaler"])
    logger.info("resumed from %s (epoch %d, step %d)", path, ckpt["epoch"], ckpt.get("step", 0))
    return ckpt


LOOP_STATE = ("shuffle_gen", "negative_gen", "meters", "loader", "torch_rng")  # what EpochState.capture stores


def check_loop_states(ckpt: dict[str, Any], path: str) -> None:
    """A mid-epoch checkpoint (step > 0) holds one loop state per process that saved it, each with every entry
    :meth:`EpochState.capture` writes; anything else is damaged or hand-made: one line, before any work."""
    step = ckpt.get("step") or 0
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise PCLError(f"--resume {path}: its 'step' is {step!r}, not a step number")
    if not step:
        return
    states = ckpt.get("resume_states")
    missing = ("no 'resume_states'" if not isinstance(states, list) or not states else
               next((f"resume_states[{i}] lacks {', '.join(k for k in LOOP_STATE if k not in st)}"
                     for i, st in enumerate(states) if not isinstance(st, dict) or set(LOOP_STATE) - set(st)), None))
    if missing:
        raise PCLError(f"--resume {path} was saved mid-epoch (step {step}) but holds {missing}: it is damaged or "
                       f"hand-made; resume an epoch-boundary checkpoint (checkpoint_NNNN.pth.tar) instead")


def agree_resume(path: str | None, head: dict[str, Any] | None) -> tuple[str | None, tuple[int, int] | None]:
    """Rank 0's --resume choice (path, and the (epoch, step) it read there) for every rank: ranks that listed
    --exp-dir differently (a stale NFS cache, a checkpoint still being copied) would otherwise start at different
    epochs and their collectives go out of step until --dist-timeout."""
    mine = (path, ckpt_io.progress(head) if head is not None else None)
    chosen = dist_utils.broadcast_object(mine)
    if chosen != mine:
        logger.warning("rank %d found --resume %s at (epoch, step) %s; rank 0 chose %s at %s: every rank takes rank "
                       "0's choice", dist_utils.rank(), mine[0], mine[1], chosen[0], chosen[1])
    return chosen


def _check_mid_epoch(ckpt: dict[str, Any], path: str, cfg: RunConfig, num_samples: int) -> None:
    """A checkpoint saved mid-epoch continues that epoch's exact batches and cluster assignment: it needs the
    same global batch and the same training set (an epoch-boundary checkpoint resumes with either changed)."""
    if not ckpt.get("step"):
        return
    saved = ckpt.get("args") or {}
    if saved.get("global_batch_size") not in (None, cfg.batch_size):
        raise PCLError(f"--resume {path} was saved mid-epoch with --batch-size {saved['global_batch_size']}; resume "
                       f"it with that batch size (now {cfg.batch_size})")
    saved_ks = [len(c) for c in (ckpt.get("cluster_result") or {}).get("centroids") or []]
    if saved_ks and saved_ks != list(cfg.num_cluster):  # its prototypes continue the epoch; --num-cluster names them
        raise PCLError(f"--resume {path} was saved mid-epoch with --num-cluster {','.join(map(str, saved_ks))}; resume "
                       f"it with those (now {','.join(map(str, cfg.num_cluster))}), or from an epoch-boundary "
                       f"checkpoint")
    assign = (ckpt.get("cluster_result") or {}).get("im2cluster") or []
    if assign and len(assign[0]) != num_samples:
        raise PCLError(f"--resume {path} was saved mid-epoch on a training set of {len(assign[0])} images, this one "
                       f"has {num_samples}: resume it on the same data")


SCHEDULE = {"epochs": "--epochs", "warmup_epoch": "--warmup-epoch", "lr": "--lr", "cos": "--cos",
            "schedule": "--schedule"}
RECIPE = {"image_size": "--image-size", "crop_min_scale": "--crop-min-scale", "aug_plus": "--aug-plus",
          "hue_space": "--hue-space", "temperature": "--temperature", "moco_m": "--moco-m",
          "num_cluster": "--num-cluster", "proto_weight": "--proto-weight", "unique_prototypes": "--unique-prototypes",
          "fixed_concentration": "--fixed-concentration", "estep_features": "--estep-features",
          "bank_views": "--bank-views", "pauc": "--pauc", "weight_decay": "--wd", "momentum": "--momentum"}
# what the run learns from: its views, its objective, its E-step, its SGD. An epoch-boundary checkpoint resumes with
# any of them changed (--pcl-r, the queue's length, is checked by the weights' shapes), but the run is then two
# recipes, so it is said.
ON_OFF = ("cos", "aug_plus", "pauc")  # BooleanOptionalAction flags: --x / --no-x (the others are store_true)


def _flag(names: dict[str, str], key: str, value: Any) -> str:
    if isinstance(value, bool):
        return names[key] if value else (f"--no-{names[key][2:]}" if key in ON_OFF else f"without {names[key]}")
    return f"{names[key]} {(',' if key == 'num_cluster' else ' ').join(map(str, value))}" \
        if isinstance(value, (list, tuple)) else f"{names[key]} {value}"


def _changed(saved: dict[str, Any], cfg: RunConfig, names: dict[str, str]) -> list[str]:
    def same(key: str) -> bool:
        plain = [list(v) if isinstance(v, (list, tuple)) else v for v in (saved[key], cfg[key])]
        return plain[0] == plain[1] or (key == "schedule" and cfg["cos"] and saved.get("cos"))  # unused with --cos

    return [f"{_flag(names, k, saved[k])} -> {_flag(names, k, cfg[k])}"
            for k in names if k in saved and k in cfg and not same(k)]


def note_schedule_change(ckpt: dict[str, Any], path: str, cfg: RunConfig) -> None:
    """Resuming with another --epochs / --warmup-epoch / --lr / --cos / --schedule than the run was started with
    changes the learning rate (and where PCL starts) from here on: one line naming the old and the new values. Another
    recipe (:data:`RECIPE`: augmentation, temperature, prototypes, E-step, SGD) is one more line; a checkpoint saved
    before --hue-space existed counts as hsv (a preset such as configs/demo.yaml that now sets yiq is named)."""
    saved = ckpt.get("args") or {}
    epoch = ckpt.get("epoch", 0)
    changed = _changed(saved, cfg, SCHEDULE)
    if changed:
        logger.warning("resuming %s with another schedule: %s (from epoch %d on the learning rate follows the new "
                       "one; the epochs already trained followed the old)", path, ", ".join(changed), epoch)
    if saved and "hue_space" not in saved:  # saved before --hue-space: the hue jitter was torchvision's HSV one (the
        saved = {**saved, "hue_space": "hsv"}  # in-memory sets' older batched augmentation differed in more than hue)
    changed = _changed(saved, cfg, RECIPE)
    if changed:
        old = [c.split(" -> ")[0] for c in changed]
        advice = " and ".join(part for part in (", ".join(o for o in old if not o.startswith("without ")),
                                                ", ".join(o for o in old if o.startswith("without "))) if part)
        logger.warning("resuming %s with another recipe: %s. From epoch %d on the run trains with these settings, the "
                       "epochs already trained used the old; to continue it unchanged, resume %s", path,
                       ", ".join(changed), epoch, advice if advice.startswith("without ") else "with " + advice)


RUN_FILES = ("log.txt", "tb", MARKER)  # what a run writes into --exp-dir besides its checkpoints (train.log: the
# folder's console log, appended by every start, keeps the line that says what each start did)


@dataclass
class FolderClaim:
    """What a start does to --exp-dir (a run folder holds one run): ``remove`` is what goes before the first save
    (with --overwrite: another run's files, or this run's checkpoints beyond the one it continues), ``note`` the line
    that says whether the run there is continued or cleared."""
    note: str
    remove: list[str] = field(default_factory=list)


def claim_exp_dir(exp_dir: str, overwrite: bool, path: str | None, head: dict[str, Any] | None,
                  auto: bool = False) -> FolderClaim:
    """Decide how this start treats the run in ``exp_dir``: a fresh start (``path`` None) needs a folder without
    checkpoints, or --overwrite (then that run is cleared completely: checkpoints, log.txt, tb/, PREEMPTED); a
    resume continues ``path`` (its ``head``: epoch, step, run_id), and a checkpoint there of another run or further
    on than ``path`` would be replaced or would win the next --resume auto: refused, or removed with --overwrite.
    Raises PCLError with the ways out; reads only the files' headers."""
    names = ckpt_io.checkpoint_files(exp_dir)
    odd = [n for n in names if os.path.isdir(n)]
    if odd:
        raise PCLError(f"--exp-dir {exp_dir}: {os.path.basename(odd[0])} is a directory, not a checkpoint; remove or "
                       f"rename it (the run saves its checkpoints under that name)")
    extras = [os.path.join(exp_dir, n) for n in RUN_FILES if os.path.lexists(os.path.join(exp_dir, n))]
    if path is None:
        if not names:
            return FolderClaim(f"a new run in {exp_dir}" + (" (--overwrite: nothing to remove)" if overwrite else ""),
                               extras if overwrite else [])
        if not overwrite:
            shown = ", ".join(map(os.path.basename, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise PCLError(f"--exp-dir {exp_dir} holds another run's checkpoints ({shown}): continue it with --resume "
                           f"auto, choose another --exp-dir, or pass --overwrite to start over there")
        return FolderClaim(f"--overwrite: removed the earlier run in {exp_dir} ({len(names)} checkpoint files"
                           + "".join(f", {os.path.basename(e)}" for e in extras) + "); a new run starts there",
                           names + extras)
    conflicts = _conflicts(exp_dir, path, head or {})
    here = f"{path} (epoch {ckpt_io.progress(head or {})[0]}, step {ckpt_io.progress(head or {})[1]})"
    if not conflicts:
        return FolderClaim(f"continuing {here} in {exp_dir}")
    shown = "; ".join(f"{os.path.basename(p)} {why}" for p, why in conflicts[:3]) + \
        (f"; and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
    if not overwrite:
        way = "remove them" if auto else "pass --overwrite to remove them first"
        raise PCLError(f"--resume {path} in --exp-dir {exp_dir}: the folder holds checkpoints that continuing it would "
                       f"replace or mix with ({shown}); give another --exp-dir, or {way}")
    other_run = any(why.startswith("of another run") for _, why in conflicts)
    remove = [p for p, _ in conflicts] + (extras if other_run else [])
    return FolderClaim(f"--overwrite: removed {len(conflicts)} checkpoint files from {exp_dir} ({shown}); continuing "
                       f"{here} there", remove)


def _conflicts(exp_dir: str, path: str, head: dict[str, Any]) -> list[tuple[str, str]]:
    """The checkpoints in ``exp_dir`` that continuing ``path`` would replace or mix with, and why: of another run
    (another run_id; from outside the folder also an unknown one), or further on (a later --resume auto would take
    them). The preempt file of the epoch being resumed is behind the run at its next save: not one of them."""
    mine, rid = ckpt_io.progress(head), head.get("run_id")
    inside = os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(exp_dir)
    found = []
    for other, theirs in ckpt_io.read_headers(exp_dir, quiet=True):
        if os.path.exists(path) and os.path.samefile(other, path):
            continue
        tag, at = theirs.get("run_id"), ckpt_io.progress(theirs)
        if (rid and tag and tag != rid) or (not inside and not (rid and tag == rid)):
            found.append((other, f"of another run (epoch {at[0]})"))
        elif at > mine and not (other == ckpt_io.preempt_path(exp_dir) and at[0] == mine[0]):
            found.append((other, f"further on (epoch {at[0]}, step {at[1]})"))
    return found


def clear_files(claim: FolderClaim) -> None:
    """Remove what ``claim`` names (rank 0, holding the folder's lock) and log its line."""
    for path in claim.remove:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    logger.info("%s", claim.note)


class Session:
    """One run's start, saves and stop (see the module docstring for the calls the loop makes)."""

    def __init__(self, cfg: RunConfig, path: str | None, ckpt: dict[str, Any] | None,
                 claim: FolderClaim | None = None) -> None:
        self.cfg, self.path, self.ckpt = cfg, path, ckpt
        self.claim = claim or FolderClaim(f"a run in {cfg.exp_dir}")
        self.resumed: dict[str, Any] = {}
        self.run_id = uuid.uuid4().hex  # shared by the run's checkpoints; a resumed run keeps its file's
        self.start_epoch = cfg.start_epoch
        self.resumed_preempt: str | None = None  # the preempt checkpoint this run resumed from, removed once passed
        self.stop = StopRequest()
        self.model = self.optimizer = self.device = self.scaler = None
        self.wandb_id: str | None = None  # the W&B run the checkpoints name (--wandb), carried over from --resume
        self.epoch, self.clusters, self.stopping = cfg.start_epoch, None, False
        self.bank: FeatureBank | None = None  # --estep-features bank: created (and restored) by load
        self.last_clusters: ClusterResult | None = None  # the prototypes of the last epoch trained with them

    @classmethod
    def prepare(cls, cfg: RunConfig) -> "Session":
        """Read and check --resume (its header only: the tensors are read once, by :meth:`load`) and how this start
        treats the run in --exp-dir (:func:`claim_exp_dir`): a wrong or unreadable file, or a start that would replace
        another run's checkpoints, fails before the dataset is scanned."""
        path, head = None, None
        if cfg.resume:
            path, head = ckpt_io.resolve_resume(cfg.resume, cfg.exp_dir)
            if head is not None:
                ckpt_io.require_pretrain_checkpoint(head, path)
                check_loop_states(head, path)
        return cls(cfg, path, head, claim_exp_dir(cfg.exp_dir, cfg.overwrite, path, head, cfg.resume == "auto"))

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: PretrainData,
             device: torch.device, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Take rank 0's --resume choice on every rank, load it into ``model``, ``optimizer`` and ``scaler`` (--amp
        fp16), then clear what the folder's claim removes (rank 0); False when the checkpoint already finished
        --epochs (nothing to train). The checkpoints this session writes hold all three."""
        cfg = self.cfg
        self.model, self.optimizer, self.device, self.scaler = model, optimizer, device, scaler
        if cfg.estep_features == "bank":
            self.bank = FeatureBank(data.num_samples, cfg.low_dim, device, cfg.bank_views)
        self.path, at = agree_resume(self.path, self.ckpt)
        self.ckpt = None
        if self.path is not None:
            path = self.path
            self.resumed = dist_utils.on_every_rank(
                lambda: load_into(path, model, optimizer, device, scaler=scaler, expect=at), f"loading --resume {path}")
            self.run_id = self.resumed.get("run_id") or self.run_id
            self.wandb_id = self.resumed.get("wandb_id")
        dist_utils.main_only(lambda: clear_files(self.claim), f"preparing --exp-dir {cfg.exp_dir}")
        clear_marker(cfg.exp_dir)  # this run continues the preempted one
        if self.path is None:
            return True
        preempt = ckpt_io.preempt_path(cfg.exp_dir)
        if os.path.exists(preempt) and os.path.exists(self.path) and os.path.samefile(self.path, preempt):
            self.resumed_preempt = preempt  # also when reached by checkpoint_last, its hard link
        _check_mid_epoch(self.resumed, self.path, cfg, data.num_samples)
        self._restore_bank()
        self.start_epoch = int(self.resumed["epoch"])
        note_schedule_change(self.resumed, self.path, cfg)
        if self.start_epoch >= cfg.epochs:  # a mid-epoch file of epoch e holds 'epoch': e, with e's rest to train
            logger.warning("nothing to train: %s is at epoch %d of --epochs %d (raise --epochs to go on)",
                           self.path, self.start_epoch, cfg.epochs)
            return False
        return True

    def _restore_bank(self) -> None:
        """The bank as the checkpoint saved it; a checkpoint without one (another --estep-features, an official
        file) leaves every row to the next E-step's feature pass."""
        if self.bank is None:
            return
        saved = self.resumed.pop("estep_bank", None)
        if saved is None:
            logger.info("--estep-features bank: %s holds no bank; the next E-step encodes every sample once",
                        self.path)
            return
        self.bank.load_state_dict(saved, self.path)

    def previous_clusters(self) -> ClusterResult | None:
        """The prototypes the resumed checkpoint holds (the E-step before it: --kmeans-init previous starts there),
        None for a fresh start."""
        saved = self.resumed.get("cluster_result")
        self.last_clusters = ClusterResult.from_state_dict(saved).to(self.device) if saved else None
        return self.last_clusters

    def __enter__(self) -> "Session":
        self.stop.install()
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: Any) -> bool:
        try:
            if isinstance(err, Stopped):
                self._save_stopped(err)  # raises Preempted
        finally:
            self.stop.restore()
        return False

    def _mid_epoch_state(self, epoch: int) -> dict[str, Any] | None:
        """This rank's captured loop state when ``epoch`` is the one a mid-epoch checkpoint stopped in."""
        if epoch != self.start_epoch or not self.resumed.get("step"):
            return None
        states = self.resumed.get("resume_states") or []
        if len(states) != dist_utils.world_size():
            raise PCLError(f"checkpoint {self.path} was saved mid-epoch by {len(states)} processes; "
                           f"resume it with the same number of processes ({len(states)})")
        return states[dist_utils.rank()]

    def begin(self, epoch: int) -> ClusterResult | None:
        """Seed the epoch (torch's global RNG: worker-less PIL augmentation draws from it) and, when it is the
        epoch a mid-epoch checkpoint stopped in, return that checkpoint's prototypes (None: run the E-step)."""
        self.epoch, self.clusters = epoch, None
        state = self._mid_epoch_state(epoch)
        if state is None:
            torch.manual_seed(epoch_seed(self.cfg.seed, epoch, 0))
            return None
        torch.set_rng_state(state["torch_rng"])
        if epoch < self.cfg.warmup_epoch:
            return None
        if "cluster_result" not in self.resumed:  # its first batches trained without prototypes: cannot go on with
            raise PCLError(f"checkpoint {self.path} was saved in the middle of warm-up epoch {epoch}; resume it "
                           f"with a --warmup-epoch above {epoch} (the run's own), or from an epoch-boundary "
                           "checkpoint")
        return ClusterResult.from_state_dict(self.resumed["cluster_result"]).to(self.device)

    def epoch_state(self, epoch: int, clusters: ClusterResult | None, loader: Any,
                    meters: tuple[str, ...]) -> EpochState:
        """The M-step's loop state for ``epoch``, the loader positioned: fresh, or restored mid-epoch."""
        self.clusters = clusters
        self.last_clusters = clusters or self.last_clusters
        state = self._mid_epoch_state(epoch)
        loader.set_epoch(epoch)
        if state is not None:
            loader.load_state_dict(state["loader"])
        return EpochState.start(self.cfg.seed, epoch, self.device, meters, self.stop, state,
                                int(self.resumed.get("step", 0)) if state is not None else 0)

    def _write(self, epoch: int, clusters: ClusterResult | None, path: str, step: int = 0,
               states: list[dict[str, Any]] | None = None) -> None:
        """Rank 0 writes the checkpoint, unless the weights diverged (then every rank stops, nothing is saved)."""
        def write() -> None:
            check_weights(self.model, f"epoch {epoch} step {step}")
            ckpt_io.save_checkpoint(checkpoint_contents(self.model, self.optimizer, epoch, self.cfg, clusters, step,
                                                        states, self.scaler, self.bank, self.wandb_id,
                                                        self.run_id), path)
            if step == 0 and self.resumed_preempt not in (None, path) and os.path.exists(self.resumed_preempt):
                os.remove(self.resumed_preempt)  # the stop this run continued from is behind it now
        dist_utils.main_only(write, f"saving {path}")

    def save(self, epoch: int, clusters: ClusterResult | None) -> None:
        """The epoch's checkpoint every --save-freq epochs, at the last one, and whenever a stop request came
        (during the last step or the monitor): saved before the epoch is logged."""
        cfg, last = self.cfg, epoch + 1 == self.cfg.epochs
        self.stopping = not last and self.stop.requested(self.device)
        if (epoch + 1) % cfg.save_freq == 0 or last or self.stopping:
            self._write(epoch, clusters, ckpt_io.checkpoint_path(cfg.exp_dir, epoch))

    def stop_if_requested(self, epoch: int) -> None:
        """After the epoch is saved and logged: raise Preempted on every rank when :meth:`save` saw a stop."""
        if self.stopping:
            raise_preempted(self.cfg.exp_dir, ckpt_io.checkpoint_path(self.cfg.exp_dir, epoch), epoch + 1, 0,
                            self.stop.name)

    def _save_stopped(self, stopped: Stopped) -> None:
        """A stop inside an epoch: mid-epoch, every rank's loop state in one checkpoint; in the E-step, the epoch
        boundary. Then Preempted on every rank."""
        path = ckpt_io.preempt_path(self.cfg.exp_dir)
        if stopped.step:
            states = dist_utils.all_gather_object(stopped.state)
            self._write(self.epoch, self.clusters, path, stopped.step, states)
        else:  # the last prototypes: where --kmeans-init previous starts the E-step again
            self._write(self.epoch - 1, self.last_clusters, path)
        raise_preempted(self.cfg.exp_dir, path, self.epoch, stopped.step, self.stop.name)
