"""The run's settings once parsed: the read-only RunConfig, YAML defaults typed like the command line, the
range of every numeric flag, and comma-separated lists. :mod:`pcl.config` builds the parsers on top."""

from __future__ import annotations

import argparse
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import yaml

from pcl import PCLError


CONFIG_RELATIVE_PATHS = ("class_list",)  # a relative path in a YAML file is relative to that file's folder


class RunConfig(Mapping[str, Any]):
    """The settings of one run: every flag of its command, resolved once after parsing and validation, then
    read-only. Read them as attributes (``cfg.lr``); a derived setting is a new object (``cfg.replace(...)``), so
    no value changes meaning on the way through the code. What resolution guarantees:"""

    batch_size: int  # the total over all processes, always (one process's share: distributed.per_process)
    seed: int  # 0 when --seed was not given (seed_given tells which)
    seed_given: bool
    dataset: str  # after validation never 'auto'
    num_cluster: tuple[int, ...]  # pretraining, after validation: the k of each granularity
    arch: str | None  # evaluations: None until the backbone is loaded, then the checkpoint's (cfg.replace)

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None, **more: Any) -> None:
        object.__setattr__(self, "_values", {**dict(values or {}), **more})

    @classmethod
    def of(cls, args: Any) -> "RunConfig":
        """A RunConfig of parsed flags (argparse/SimpleNamespace, a mapping, or a RunConfig: returned as is)."""
        if isinstance(args, RunConfig):
            return args
        return cls(args if isinstance(args, Mapping) else vars(args))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"the run's settings have no '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the run's settings are read-only: derive new ones with .replace({name}=...)")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __reduce__(self):  # pickled to the spawned workers
        return RunConfig, (dict(self._values),)

    def __repr__(self) -> str:
        return "RunConfig(" + ", ".join(f"{k}={v!r}" for k, v in sorted(self._values.items())) + ")"

    def replace(self, **changes: Any) -> "RunConfig":
        return RunConfig(self._values, **changes)

    def plain(self) -> dict[str, Any]:
        """The settings of plain types (tuples as lists), as a checkpoint's ``args`` stores them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._values.items()
                if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


# The groups each part of pretraining receives, built once from the resolved flags (the flag names are the
# fields' sources; no part reads the whole command line or supplies a default of its own).


@dataclass(frozen=True)
class DistSettings:
    """How this process joins the others: the launcher's flags (and ``local_rank``, set by the spawn launcher)."""
    world_size: int  # nodes with the spawn launcher, processes otherwise; -1: from torchrun's WORLD_SIZE or one
    rank: int  # node rank (spawn launcher) or process rank; -1: from torchrun's RANK or 0
    dist_url: str
    dist_backend: str | None  # None: nccl on GPU, gloo on CPU
    dist_timeout: float  # minutes a collective may wait
    gpu: int | None
    multiprocessing_distributed: bool
    nproc: int | None  # processes per node of the spawn launcher
    local_rank: int  # this process's index on its node (spawn launcher)
    cpu: bool
    seed_given: bool  # --seed given: cuDNN deterministic, as official

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> "DistSettings":
        cfg = RunConfig.of(cfg)
        return cls(cfg["world_size"], cfg["rank"], cfg["dist_url"], cfg["dist_backend"], cfg["dist_timeout"],
                   cfg["gpu"], cfg["multiprocessing_distributed"], cfg["nproc"], cfg["local_rank"], cfg["cpu"],
                   cfg["seed_given"])


@dataclass(frozen=True)
class DataSettings:
    """Which images, at what size, through which loaders: the data flags every entry point shares, plus the
    batch, the seed and the number of this process's loader workers."""
    dataset: str  # a name of the dataset table (never 'auto')
    data: str | None  # DIR
    download: bool
    image_size: int
    crop_min_scale: float
    batch_size: int  # the total over all processes; each process gets its share (distributed.per_process)
    seed: int
    workers: int  # loader workers of this process: -j per node divided among the node's processes
    workers_per_node: int  # -j as given (the SVM features use it as is: they run in one process)
    prefetch_factor: int
    persistent_workers: bool
    loader_timeout: float  # minutes
    bad_images: str  # fail | skip
    class_list: str | None
    expect_images: int
    expect_classes: int
    augment: str  # pil | device
    decode: str  # cpu | device
    demo_renders: int
    aug_plus: bool  # pretraining's MoCo v2 augmentation; the evaluation commands have no two-crop views: False
    unlabelled: bool  # --unlabelled: DIR's images have no classes, whatever its folders (False where no such flag)
    hue_space: str  # the batched augmentation's hue jitter: hsv (official) | yiq (pretraining's --hue-space)

    @classmethod
    def of(cls, cfg: Mapping[str, Any], workers: int) -> "DataSettings":
        """``workers``: this process's loader workers (``distributed.loader_workers`` once the group is up)."""
        cfg = RunConfig.of(cfg)
        return cls(cfg["dataset"], cfg["data"], cfg["download"], cfg["image_size"], cfg["crop_min_scale"],
                   cfg["batch_size"], cfg["seed"], workers, cfg["workers"], cfg["prefetch_factor"],
                   cfg["persistent_workers"], cfg["loader_timeout"], cfg["bad_images"], cfg["class_list"],
                   cfg["expect_images"], cfg["expect_classes"], cfg["augment"], cfg["decode"], cfg["demo_renders"],
                   cfg["aug_plus"] if "aug_plus" in cfg else False, cfg.get("unlabelled", False),
                   cfg.get("hue_space", "hsv"))


@dataclass(frozen=True)
class ModelSettings:
    """The MoCo model pretraining builds: backbone, head, queue and key encoder."""
    arch: str
    width: int
    stem: str
    low_dim: int
    mlp: bool
    pcl_r: int  # queue length
    moco_m: float
    bn_splits: int  # resolved: 8 in one process (shuffle-BN stand-in), 1 with DDP, unless --bn-splits

    @classmethod
    def of(cls, cfg: Mapping[str, Any], world: int) -> "ModelSettings":
        cfg = RunConfig.of(cfg)
        return cls(cfg["arch"], cfg["width"], cfg["stem"], cfg["low_dim"], cfg["mlp"], cfg["pcl_r"], cfg["moco_m"],
                   cfg["bn_splits"] or (8 if world == 1 else 1))


@dataclass(frozen=True)
class OptimSettings:
    """SGD and its learning-rate schedule."""
    lr: float
    momentum: float
    weight_decay: float
    sgd_impl: str  # auto | foreach | fused | loop
    cos: bool
    schedule: tuple[int, ...]  # step-schedule milestones (without --cos)
    epochs: int

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> "OptimSettings":
        cfg = RunConfig.of(cfg)
        return cls(cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["sgd_impl"], cfg["cos"],
                   tuple(cfg["schedule"]), cfg["epochs"])


@dataclass(frozen=True)
class EStepSettings:
    """The E-step: the granularities, k-means and the concentration phi."""
    num_cluster: tuple[int, ...]  # k of each granularity (--num-cluster)
    temperature: float  # phi is rescaled to this mean (--temperature)
    niter: int  # Lloyd iterations (--kmeans-niter)
    nredo: int  # restarts, the best kept (--kmeans-nredo)
    backend: str  # auto | faiss | torch (all on rank 0) | torch-ranks (every rank its own rows) (--kmeans-backend)
    fixed_concentration: bool  # ablation: phi = --temperature for every prototype
    progress: bool  # a progress bar on rank 0 (not --no-progress)
    keep_features: bool  # rank 0 returns the N x C features (the galleries read them; --prototype-gallery)
    precision: str  # the PyTorch k-means' assignment step: fp32 (as faiss) | tf32 | bf16 (--kmeans-precision)
    reseed: bool  # ablation: a fresh k-means seed per E-step (--kmeans-reseed); official: seed g every epoch
    run_seed: int  # --seed, what the fresh seeds are drawn from
    features: str = "pass"  # pass (official centre-crop feature pass) | bank (the M-step's keys) (--estep-features)
    init: str = "random"  # random (official) | previous: warm start from the last E-step's centroids (--kmeans-init)
    warm_check: int = 0  # every this many E-steps a warm start is compared with a cold one (--kmeans-warm-check)
    amp: str = "none"  # the feature pass's precision, the run's --amp (none: fp32, official)
    channels_last: bool = False  # the feature pass's memory format, the run's --channels-last (GPUs only)

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> "EStepSettings":
        return cls(tuple(cfg["num_cluster"]), cfg["temperature"], cfg["kmeans_niter"], cfg["kmeans_nredo"],
                   cfg["kmeans_backend"], cfg["fixed_concentration"], not cfg["no_progress"], cfg["prototype_gallery"],
                   cfg["kmeans_precision"], cfg["kmeans_reseed"], cfg["seed"], cfg["estep_features"],
                   cfg["kmeans_init"], cfg["kmeans_warm_check"], cfg["amp"], cfg["channels_last"])

    def kmeans_seed(self, epoch: int) -> int:
        """The k-means seed of the E-step at ``epoch`` (granularity g adds g): 0, as official, or with
        --kmeans-reseed one drawn from (--seed, epoch)."""
        return (self.run_seed * 1_000_003 + epoch) * 7919 % 2 ** 31 if self.reseed else 0


@dataclass(frozen=True)
class StepSettings:
    """One M-step epoch's options besides the loss: precision, memory format, how often the host looks."""
    amp: str  # none | bf16 | fp16
    channels_last: bool  # NHWC inputs (already resolved for the device)
    print_freq: int  # steps between host reads of the meters and the loss check
    progress: bool

    @classmethod
    def of(cls, cfg: Mapping[str, Any], channels_last: bool) -> "StepSettings":
        return cls(cfg["amp"], channels_last, cfg["print_freq"], not cfg["no_progress"])


@dataclass(frozen=True)
class MonitorSettings:
    """What pretraining observes: galleries, the kNN/NMI monitor, the final kNN report."""
    num_cluster: tuple[int, ...]
    epochs: int
    seed: int  # the galleries' draw of prototypes
    prototype_gallery: bool
    knn_every: int  # epochs between kNN/NMI monitor passes (0: off)
    knn_eval: bool  # the final report: learned, random init, raw pixels
    knn_k: int
    knn_t: float
    knn_budget_bytes: int  # --knn-max-bank-gb
    image_size: int  # the raw-pixel baseline's resolution
    kmeans_backend: str  # the monitor's NMI k-means
    kmeans_reseed: bool = False  # --kmeans-reseed: each E-step's seed is logged
    dataset: str = ""  # the run's data (resolved --dataset, DIR, its flags, -c), for the end-of-run commands
    data: str | None = None
    demo_renders: int = 4
    class_list: str | None = None
    bad_images: str = "fail"
    unlabelled: bool = False
    config: str | None = None

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> "MonitorSettings":
        return cls(tuple(cfg["num_cluster"]), cfg["epochs"], cfg["seed"], cfg["prototype_gallery"], cfg["knn_every"],
                   cfg["knn_eval"], cfg["knn_k"], cfg["knn_t"], int(cfg["knn_max_bank_gb"] * 2 ** 30),
                   cfg["image_size"], "torch" if cfg["kmeans_backend"] == "torch-ranks" else cfg["kmeans_backend"],
                   cfg["kmeans_reseed"], cfg["dataset"], cfg["data"], cfg["demo_renders"], cfg["class_list"],
                   cfg["bad_images"], cfg.get("unlabelled", False), cfg.get("config"))


def cannot_read(path: str, e: OSError, verb: str = "read") -> PCLError:
    """The one-line error of an input (or output) that the OS refuses: 'cannot read FILE: Permission denied'."""
    return PCLError(f"cannot {verb} {path}: {e.strerror or e}")


def read_text(path: str, what: str, expected: str) -> str:
    """A text file every entry point reads (a config, a class or subset list) as UTF-8 (a byte-order mark
    dropped), or one PCLError naming ``what`` it is, the file, and why: not found, a directory, unreadable, not
    UTF-8 text (``expected`` says what it should hold)."""
    if os.path.isdir(path):
        raise PCLError(f"{what} {path} is a directory, not a file ({expected})")
    if not os.path.isfile(path):
        raise PCLError(f"{what} file not found: {path} ({expected})")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except OSError as e:
        raise cannot_read(path, e) from None
    except UnicodeDecodeError as e:
        raise PCLError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                       f"save it as UTF-8 ({expected})") from None


def load_config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Read a YAML file into parser defaults; unknown keys raise :class:`PCLError`."""
    text = read_text(path, "config", "a YAML file of flag names and values")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise PCLError(f"config {path} is not valid YAML: {e}") from None
    except _DuplicateKey as e:
        raise PCLError(f"config {path}: key '{e.key}' is given twice (lines {e.lines[0]} and {e.lines[1]}); keep "
                       f"one (YAML would silently take the last)") from None
    if not isinstance(raw, dict):
        raise PCLError(f"config {path} must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = [str(key) for key in raw if str(key).lstrip("-").replace("-", "_") not in actions]
    if unknown:
        raise PCLError(f"config {path}: " + "; ".join(_unknown_key(key, actions) for key in unknown)
                       + " (valid keys are the command-line flags, see --help)")
    defaults, spelled = {}, {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in spelled:
            raise PCLError(f"config {path}: keys '{spelled[dest]}' and '{key}' are the same flag; keep one")
        spelled[dest] = key
        value = yaml_value(actions[dest], value, f"config {path}: key '{key}'")
        if dest in CONFIG_RELATIVE_PATHS and isinstance(value, str) and not os.path.isabs(value):
            value = os.path.join(os.path.dirname(os.path.abspath(path)), value)
        defaults[dest] = value
    return defaults


class _DuplicateKey(Exception):
    def __init__(self, key: str, lines: tuple[int, int]) -> None:
        super().__init__(key)
        self.key, self.lines = key, lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(str(key), (seen[key], line))
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def _unknown_key(key: str, actions: Mapping[str, argparse.Action]) -> str:
    """'unknown key K' with the nearest key, if one is close (a typo, a plural, dashes for underscores)."""
    close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), list(actions), n=1, cutoff=0.75)
    return f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")


LIST_KEYS = ("num_cluster",)  # str flags that also take a YAML list


def yaml_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value checked and converted as argparse would the flag's text (YAML bypasses ``type`` and
    ``choices``): switches take true/false only, int flags integers only (1.5 is not 1), lists for nargs flags,
    and the value must be one of the choices. Raises PCLError naming the key and what it takes."""
    if value is None:
        if action.default is not None:  # only a flag that is unset by default takes null (= unset)
            raise PCLError(f"{where} is null (empty): give it a value, or delete the line to keep the default "
                           f"({action.default!r})")
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise PCLError(f"{where} is a switch: write true or false (unquoted), not {value!r}")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [yaml_scalar(action, v, where) for v in items]
    if isinstance(value, list) and action.dest in LIST_KEYS:
        return [yaml_scalar(action, v, where) for v in value]
    return yaml_scalar(action, value, where)


def yaml_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type
    if isinstance(value, (list, dict)):
        raise PCLError(f"{where} takes one value, not {value!r}")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and
                                                                        value.strip().lstrip("-").isdigit())):
            raise PCLError(f"{where} takes an integer, not {value!r}")
        value = int(value)
    elif kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        except ValueError:
            raise PCLError(f"{where} takes a number, not {value!r}") from None
    elif kind is str or kind is None:
        if isinstance(value, bool):
            raise PCLError(f"{where} takes text, not {value!r}")
        value = str(value)
    elif callable(kind):
        try:
            value = kind(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise PCLError(f"{where}: {value!r} is not valid ({e})") from None
    if action.choices is not None and value not in action.choices:
        raise PCLError(f"{where} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return value


def _finite(v: float) -> bool:
    return math.isfinite(v)


def _at_least(low: int, note: str = "") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}{note}"


_POSITIVE = (lambda v: _finite(v) and v > 0), "a finite number > 0"
_NON_NEGATIVE = (lambda v: _finite(v) and v >= 0), "a finite number >= 0"
_EPOCH_LIST = (lambda v: all(m >= 0 for m in v)), "epochs >= 0"

# dest -> (valid?, the valid range in words); a value of None (flag unset) is always valid
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("workers", "start_epoch", "warmup_epoch", "cached_views", "gpu"), _at_least(0)),
    "seed": ((lambda v: 0 <= v < 2 ** 63), ">= 0 and below 2**63 (torch.Generator seeds are 64-bit)"),
    **dict.fromkeys(("prefetch_factor", "demo_renders", "width", "low_dim", "nproc", "epochs", "batch_size",
                     "print_freq", "pcl_r", "kmeans_niter", "kmeans_nredo", "bn_splits", "knn_k", "runs",
                     "svm_max_iter", "gallery_rows", "columns", "queries"), _at_least(1)),
    **dict.fromkeys(("expect_images", "expect_classes", "knn_every", "kmeans_warm_check"), _at_least(0, " (0: off)")),
    **dict.fromkeys(("lr", "temperature", "knn_t", "pauc_alpha", "pauc_t", "lr_last_layer", "knn_max_bank_gb"),
                    _POSITIVE),
    # minutes; torch's rendezvous sockets overflow from about 1e10 (a 'timed out after ...ms' dump at once)
    "dist_timeout": ((lambda v: _finite(v) and 0 < v <= 1e6), "a number of minutes > 0 and at most 1e6"),
    **dict.fromkeys(("weight_decay", "pauc_align", "pauc_uniform", "pauc_corr", "loader_timeout", "proto_weight"),
                    _NON_NEGATIVE),
    **dict.fromkeys(("schedule", "decay_epochs"), _EPOCH_LIST),
    "image_size": _at_least(8, " (pixels)"),
    "save_freq": _at_least(1, " (epochs between checkpoints; the last epoch is always saved)"),
    "proto_chunks": _at_least(1, " (1 = the whole batch)"),
    "num_classes": _at_least(2),
    "tsne_samples": _at_least(5),
    "crop_min_scale": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "momentum": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "moco_m": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "gamma": ((lambda v: _finite(v) and 0 < v <= 1), "in (0, 1]"),
    "n_jobs": ((lambda v: v != 0), "-1 (all cores) or a positive number"),
    "world_size": ((lambda v: v == -1 or v >= 1), "-1 (from the environment) or >= 1"),
    "rank": ((lambda v: v >= -1), "-1 (from the environment) or >= 0"),
}


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every numeric setting against its meaning, once, before any work: one line naming the flag, the value
    and the valid range (values from a YAML file are checked the same way)."""
    for action in parser._actions:
        rule = RANGES.get(action.dest)
        value = getattr(args, action.dest, None)
        if rule is None or value is None or isinstance(value, (str, bool)):
            continue  # str: a flag of the same name that takes a list elsewhere (e.g. the kNN command's --knn-k)
        ok, words = rule
        try:
            valid = ok(value)
        except TypeError:
            valid = False
        if not valid:
            flag = "/".join(o for o in action.option_strings if o.startswith("--")) or action.dest
            raise PCLError(f"{flag} {value}: must be {words}")


def parse_list(value: Any, flag: str, kind: Callable[[str], Any] = int, example: str = "1,2,4",
               valid: Callable[[Any], bool] = lambda v: True, must: str = "") -> list[Any]:
    """A comma-separated flag ('1,2,4', or a YAML list) -> its items converted by ``kind``; an empty, malformed
    or invalid list is one PCLError naming the flag, the value and an example."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        out = [kind(str(v).strip()) for v in items if str(v).strip() != ""]
    except ValueError:
        raise PCLError(f"{flag} '{value}' is malformed: give comma-separated values, e.g. {example}") from None
    if not out or not all(valid(v) for v in out):
        raise PCLError(f"{flag} '{value}'{must or ' is empty: give at least one value'} (e.g. {example})")
    return out
