"""The one argument parser shared by every entry point.

The official PCL/MoCo flags keep their names, meanings and defaults. ``-c/--config FILE.yaml`` sets
defaults (keys are flag names with ``-`` or ``_``); anything on the command line wins; an unknown key is
an error. Validation that argparse cannot express lives in :func:`validate_pretrain_args`; the settings object
(:class:`~pcl.settings.RunConfig`), YAML typing and the flag ranges in :mod:`pcl.settings`.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from typing import Any, Sequence

from pcl import PCLError
from pcl.data import registry
from pcl.settings import (RANGES, RunConfig, check_ranges, load_config_defaults, parse_list, yaml_scalar,  # noqa: F401
                          yaml_value)

ARCH_HELP = "any torchvision ResNet name (resnet18, resnet50, wide_resnet50_2, ...)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default, unless its text already says what the default is (one default per flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _HelpFormatter(prog, max_help_position=36)


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (``--epoch`` is not taken for ``--epochs``: with this many flags a typo
    would silently set another one) and with one-line errors: an unknown flag names the nearest real one, as an
    unknown YAML key does, instead of a usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's hook: must not return
        hints = []
        if message.startswith("unrecognized arguments: "):
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for word in message.split(": ", 1)[1].split():
                flag = word.split("=", 1)[0]
                longer = [f for f in flags if f.startswith(flag)]  # an abbreviation: argparse no longer guesses
                close = longer[:2] or difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
                hints += [f"{flag}: did you mean {' or '.join(close)}?"] if close and flag.startswith("--") else []
        hint = f" ({'; '.join(hints)})" if hints else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}; see {self.prog} --help\n")


def data_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="dataset root: an ImageFolder root with train/ (and val/), or the torchvision root "
                        "for --dataset cifar10/cifar100/stl10; overrides --dataset demo")
    g.add_argument("--dataset", default="auto",
                   choices=[registry.AUTO, *registry.names("data")],
                   help="auto: imagefolder when DIR is given, else an error; mnist/fashion-mnist/kmnist: DIR holds "
                        "the four idx files (.gz or not), or DIR/<Name>/raw as torchvision keeps them")
    g.add_argument("--download", action="store_true",
                   help="allow torchvision to download CIFAR/STL/the MNIST family (never done otherwise)")
    g.add_argument("--image-size", default=224, type=int, help="crop size of the augmentations")
    g.add_argument("--crop-min-scale", default=0.2, type=float,
                   help="smallest area fraction of RandomResizedCrop (official 0.2)")
    g.add_argument("-j", "--workers", default=min(32, os.cpu_count() or 1), type=int, metavar="N",
                   help="data loading workers per node, divided among the node's processes as official (default: "
                        "32, the official value, capped at the cores)")
    g.add_argument("--prefetch-factor", default=2, type=int, help="batches each loader worker prepares ahead")
    g.add_argument("--persistent-workers", action="store_true",
                   help="keep loader workers between epochs (saves start-up time; their augmentation streams then "
                        "continue across epochs, so a resumed file-dataset run no longer replays crops exactly)")
    g.add_argument("--loader-timeout", default=30.0, type=float, metavar="MIN",
                   help="with loader workers, stop with a one-line error when no batch has come for MIN minutes (a "
                        "stuck network file system; 0: wait forever). Without workers a blocked read cannot be cut")
    g.add_argument("--bad-images", default="fail", choices=["fail", "skip"],
                   help="an unreadable image file: stop with its name (fail), or use the next readable one and "
                        "log a warning with a running count (skip)")
    g.add_argument("--class-list", default=None, metavar="FILE",
                   help="ImageFolder: use only the class folders listed in FILE (one per line, e.g. ImageNet wnids), "
                        "labelled in the file's order, in every split (configs/class_lists/imagenet100.txt: ImageNet-100)")
    g.add_argument("--expect-images", default=0, type=int, metavar="N",
                   help="presets: stop at start-up unless the training split holds exactly N images (0: no check)")
    g.add_argument("--expect-classes", default=0, type=int, metavar="C",
                   help="presets: stop at start-up unless the training split has C classes (0: no check)")
    g.add_argument("--augment", default="pil", choices=["pil", "device"],
                   help="file datasets, pretraining: pil = the official PIL pipeline in the loader workers; device = "
                        "workers only decode and take the official RandomResizedCrop + flip (uint8, 4x less to copy), "
                        "colour jitter (torchvision's ops and random order), grayscale, blur and normalisation run "
                        "batched on the training device (and the E-step's center crops are normalised there)")
    g.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                   help="with --augment device, image folders, pretraining pairs: cpu = the workers decode each JPEG "
                        "and resize the crop; device = the workers only read the file and its header and draw the "
                        "official crop boxes and flips, the JPEGs are decoded batched on the training device "
                        "(torchvision decode_jpeg, nvJPEG on CUDA; torchvision >= 0.19), cropped and resized there "
                        "(PNGs and CMYK JPEGs are still decoded in the workers; a file the device refuses is decoded "
                        "on the host, --bad-images applying, and logged once per epoch)")
    g.add_argument("--demo-renders", default=4, type=int,
                   help="demo set: renders of each training digit (test digits get 2)")
    return p


def add_unlabelled_flag(p: argparse.ArgumentParser) -> None:
    """--unlabelled, in the data group of the commands that take images without classes (pretraining, visualize)."""
    group = next(g for g in p._action_groups if g.title == "data")
    group.add_argument("--unlabelled", action="store_true",
                       help="DIR's images have no classes: every image under DIR/train/ (or DIR), its subfolders "
                            "carrying no class; a flat folder of images needs no flag. No kNN/NMI report then")


def model_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("-a", "--arch", metavar="ARCH", default="resnet50", help=ARCH_HELP)
    g.add_argument("--width", default=64, type=int,
                   help="channels of the first ResNet stage (64 = torchvision); smaller for CPU demos")
    g.add_argument("--stem", default="standard", choices=["standard", "small"],
                   help="small: 3x3 conv stride 1 and no max-pool, for 32-96 px images")
    g.add_argument("--low-dim", default=128, type=int, help="feature dimension")
    g.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=False, help="MLP projection head (PCL v2)")
    return p


def dist_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("distributed / device")
    g.add_argument("--world-size", default=-1, type=int, help="number of nodes (processes with env://)")
    g.add_argument("--rank", default=-1, type=int, help="node rank for distributed training")
    g.add_argument("--dist-url", default="env://", type=str, help="url used to set up distributed training")
    g.add_argument("--dist-backend", default=None, type=str, help="nccl on GPU, gloo on CPU when unset")
    g.add_argument("--dist-timeout", default=120, type=float, metavar="MIN",
                   help="minutes a collective may wait before the run is declared hung (default 120: the other "
                        "ranks wait in one while rank 0 runs the E-step's k-means; NCCL's own 10 would kill it)")
    g.add_argument("--gpu", default=None, type=int, help="GPU id to use")
    g.add_argument("--multiprocessing-distributed", action="store_true",
                   help="one process per GPU on each node, spawned by this script")
    g.add_argument("--nproc", default=None, type=int,
                   help="processes per node for --multiprocessing-distributed (default: the GPU count; 1 on CPU)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    g.add_argument("--seed", default=None, type=int,
                   help="seed of every random draw (default 0; CPU runs are bitwise reproducible). Giving one also "
                        "makes cuDNN deterministic, as the official code does")
    g.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    g.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return p


def _add_sgd_args(g: Any, epochs: int, lr: float, schedule: list[int], weight_decay: float) -> None:
    """The official SGD flags (same names in main_pcl.py and eval_cls_imagenet.py), with per-script defaults."""
    g.add_argument("--epochs", default=epochs, type=int, metavar="N", help="number of total epochs to run")
    g.add_argument("--start-epoch", default=0, type=int, metavar="N", help="manual epoch number (restarts)")
    g.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                   help="total batch size over all processes (each process gets batch / world size)")
    g.add_argument("--lr", "--learning-rate", default=lr, type=float, metavar="LR", dest="lr",
                   help="initial learning rate (for the total batch)")
    g.add_argument("--schedule", default=schedule, nargs="*", type=int, help="epochs at which lr drops 10x")
    g.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", default=weight_decay, type=float, metavar="W", dest="weight_decay",
                   help="SGD weight decay")


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (official defaults)")
    _add_sgd_args(g, epochs=200, lr=0.03, schedule=[120, 160], weight_decay=1e-4)
    g.add_argument("--cos", action=argparse.BooleanOptionalAction, default=False, help="cosine lr schedule (PCL v2)")
    g.add_argument("-p", "--print-freq", default=100, type=int, metavar="N", help="log every N steps")
    g.add_argument("--resume", default="", type=str, metavar="PATH",
                   help="checkpoint to resume from; 'auto': the furthest readable one in --exp-dir (none: start "
                        "fresh). Checkpoints in --exp-dir of another run, or further on than PATH, are refused "
                        "(--overwrite removes them)")
    g.add_argument("--save-freq", default=5, type=int, help="checkpoint every N epochs (and at the end)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --exp-dir that holds another run: its checkpoints, log.txt, tb/ are "
                        "removed first (with --resume PATH: the checkpoints PATH would replace); without it such a "
                        "start is refused (continue that run with --resume auto)")
    g.add_argument("--exp-dir", default="experiment_pcl", type=str, help="experiment directory")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast the encoders (loss stays fp32); changes numerics, off by default")
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format for the encoders and inputs (faster convs with --amp on GPUs; "
                        "ignored on the CPU, see docs/training.md)")
    g.add_argument("--compile", action="store_true", help="torch.compile the two encoders (first steps are slow; under DDP the gradient all-reduce "
                        "no longer overlaps the backward and the first E-step recompiles: docs/training.md)")
    g.add_argument("--sgd-impl", default="auto", choices=["auto", "foreach", "fused", "loop"],
                   help="SGD kernel: auto (torch's choice), foreach, fused (one kernel), loop (per-parameter)")



def _add_pcl_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PCL")
    g.add_argument("--pcl-r", default=16384, type=int,
                   help="queue size, and number of negative prototypes per granularity")
    g.add_argument("--moco-m", default=0.999, type=float, help="momentum of the key encoder")
    g.add_argument("--temperature", default=0.2, type=float,
                   help="InfoNCE temperature; mean of the prototype concentrations")
    g.add_argument("--aug-plus", action=argparse.BooleanOptionalAction, default=False, help="MoCo v2 augmentation (PCL v2)")
    g.add_argument("--hue-space", default="hsv", choices=["hsv", "yiq"],
                   help="the batched augmentation's hue jitter (in-memory sets, --augment device): hsv = torchvision's "
                        "(official); yiq = the same angle turned in YIQ's chroma plane, which keeps each pixel's luma "
                        "(not official; the demo preset's: kNN 40.7 vs 28.3 %% on the demo renders, "
                        "docs/results/demo.md)")
    g.add_argument("--num-cluster", default="25000,50000,100000", type=str,
                   help="comma-separated k of each granularity")
    g.add_argument("--warmup-epoch", default=20, type=int,
                   help="epochs of InfoNCE only before the first E-step (>= --epochs: MoCo only)")
    g.add_argument("--kmeans-backend", default="auto", choices=["auto", "faiss", "torch", "torch-ranks"],
                   help="auto: faiss (GPU index when available), else the PyTorch k-means, all on rank 0 as official; "
                        "torch-ranks: the PyTorch k-means on every rank's own features (sums all-reduced per "
                        "iteration, no N x d gather; the same result as torch)")
    g.add_argument("--kmeans-precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="the PyTorch k-means' assignment step in each Lloyd iteration: fp32 as faiss (default), or "
                        "TF32 (CUDA) / bf16 matmuls (bf16 inputs, fp32 sums and scores; faster on CUDA only); the best "
                        "run, the final assignments and phi stay fp32 "
                        "(agreement with fp32: benchmarks/bench_kmeans.py --precision)")
    g.add_argument("--estep-features", default="pass", choices=["pass", "bank"],
                   help="what the E-step clusters: pass = a centre-crop feature pass over the training set with the "
                        "momentum encoder (official); bank = the momentum keys the training steps computed during the "
                        "previous epoch, kept in an N x --low-dim bank (no second pass; not official)")
    g.add_argument("--bank-views", default="pair", choices=["pair", "key"],
                   help="with --estep-features bank, what a sample's row holds: pair = the mean of its key (one view, "
                        "key encoder) and its query (the other view, query encoder), both computed by the step anyway "
                        "(default: measured closer to the feature pass); key = the key alone")
    g.add_argument("--kmeans-init", default="random", choices=["random", "previous"],
                   help="random = --kmeans-nredo starts from random rows (official); previous = one run per "
                        "granularity from the previous E-step's centroids (not official)")
    g.add_argument("--kmeans-warm-check", default=10, type=int, metavar="E",
                   help="with --kmeans-init previous: every E-th E-step also clusters from random starts and logs "
                        "the NMI between the warm and cold assignments and both objectives (0: never)")
    g.add_argument("--kmeans-niter", default=20, type=int, help="Lloyd iterations (official 20)")
    g.add_argument("--kmeans-nredo", default=5, type=int, help="k-means restarts, best kept (official 5)")
    g.add_argument("--fixed-concentration", action="store_true",
                   help="ablation: every prototype's temperature phi = --temperature instead of the estimated "
                        "concentration (Eq. 12)")
    g.add_argument("--kmeans-reseed", action="store_true",
                   help="ablation, not official: a fresh k-means seed at every E-step (drawn from --seed and the "
                        "epoch, logged as kmeans_seed) instead of the official seed g for granularity g every time")
    g.add_argument("--proto-weight", default=1.0, type=float, metavar="W",
                   help="ablation, not official (1 = official): the ProtoNCE term's weight in the loss")
    g.add_argument("--unique-prototypes", action="store_true",
                   help="not in the official code: each prototype enters a sample's ProtoNCE denominator once (copies "
                        "of its own prototype, brought in by batch-mates of the same cluster, are masked out)")
    g.add_argument("--proto-chunks", default=1, type=int,
                   help="ProtoNCE per block of batch/N rows, each with its own positives and negative draw: N "
                        "devices' worth on one (with batch 256: 4 = the paper's 4 V100s, 64 rows each; 8 = an "
                        "8-GPU node, 32 each); 1 = the whole per-process batch, as the official code on one GPU")
    g.add_argument("--bn-splits", default=None, type=int,
                   help="single process: BatchNorm over this many sub-batches (shuffle-BN on one device); "
                        "default 8 with one process (an 8-GPU node's worth; the paper used 4 V100s), 1 with DDP")


def _add_pauc_and_monitor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PAUC (Mo et al. 2022, a reconstruction; off by default)")
    g.add_argument("--pauc", action=argparse.BooleanOptionalAction, default=False,
                   help="add alignment / uniformity / correlation terms to ProtoNCE after warm-up")
    g.add_argument("--pauc-align", default=1.0, type=float, help="weight of the alignment term")
    g.add_argument("--pauc-uniform", default=1.0, type=float, help="weight of the uniformity term")
    g.add_argument("--pauc-corr", default=0.01, type=float,
                   help="weight of the correlation term (a sum over d(d-1) pairs, ~30-60 at start; weight 1 collapsed "
                        "the demo run)")
    g.add_argument("--pauc-alpha", default=2.0, type=float, help="alignment exponent")
    g.add_argument("--pauc-t", default=2.0, type=float, help="uniformity temperature")
    g = p.add_argument_group("monitoring")
    g.add_argument("--prototype-gallery", action=argparse.BooleanOptionalAction, default=True,
                   help="at each E-step, one TensorBoard image per granularity: prototypes (8 drawn with --seed, "
                        "the largest, the smallest) by their members nearest to the centroid")
    g.add_argument("--knn-eval", action=argparse.BooleanOptionalAction, default=False,
                   help="at the end, print kNN top-1 on the labelled test split: learned, random init, pixels")
    g.add_argument("--knn-every", default=0, type=int,
                   help="every N epochs, log kNN top-1 of the learned backbone on the labelled test split (0: off)")
    g.add_argument("--knn-k", default=20, type=int, help="neighbours of the kNN classifier")
    g.add_argument("--knn-t", default=0.07, type=float, help="temperature of the weighted kNN vote")
    g.add_argument("--wandb", action="store_true",
                   help="also log the TensorBoard scalars, histograms and galleries to Weights & Biases (rank 0; "
                        "pip install wandb). Its own environment sets the rest: WANDB_MODE=offline logs without a "
                        "server. The run id is kept in the checkpoints: --resume continues the same W&B run")
    g.add_argument("--wandb-project", default="pcl", help="the W&B project of --wandb")
    g.add_argument("--knn-max-bank-gb", default=8.0, type=float, metavar="GB",
                   help="the kNN monitor's feature bank on rank 0 at most (x2 while it is gathered): a larger one keeps "
                        "every m-th training image, and the raw-pixel baseline pools its images (both logged)")


def build_pretrain_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="PCL pretraining (E-step: k-means + concentration; M-step: ProtoNCE)",
        parents=[data_parser(), model_parser(), dist_parser()],
        formatter_class=_formatter,
    )
    p.add_argument("-c", "--config", default=None, help="YAML file of defaults; the command line wins")
    add_unlabelled_flag(p)
    _add_pretrain_args(p)
    _add_pcl_args(p)
    _add_pauc_and_monitor_args(p)
    return p


def _add_eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, help="YAML file of defaults; the command line wins")
    p.add_argument("--pretrained", default="", type=str, metavar="PATH",
                   help="checkpoint of ours or of the official PCL/MoCo code (module.encoder_q.*, v1 or mlp v2); "
                        "empty: random initialisation (a baseline)")
    p.add_argument("--exp-dir", default="experiment_eval", type=str, help="where logs, results and checkpoints go")
    # the architecture and the image size come from the checkpoint unless given (None: not given; see
    # pcl.evaluation.common.follow_checkpoint): a given architecture must match it, a given image size may differ
    p.set_defaults(arch=None, width=None, stem=None, image_size=None, crop_min_scale=0.08)
    follows = {"arch": ARCH_HELP + "; default: the checkpoint's (resnet50 without --pretrained)",
               "width": "channels of the first ResNet stage; default: the checkpoint's (64 without --pretrained)",
               "stem": "standard or small (3x3 conv, no max-pool); default: the checkpoint's (standard without "
                       "--pretrained)",
               "image_size": "crop size of the evaluation; default: the size the checkpoint was trained at (224 "
                             "for official checkpoints and without --pretrained); another size is evaluated with a "
                             "warning"}
    for action in p._actions:
        action.help = follows.get(action.dest, action.help)


def eval_command_parser(description: str, batch: int | None = 256, spawns: bool = True) -> argparse.ArgumentParser:
    """The parser every evaluation command starts from: the shared data / model / distributed flags,
    -c/--config, --pretrained, --exp-dir, and (``batch`` not None) -b/--batch-size for the feature pass.
    ``spawns`` False: a one-process command (it runs alone or under torchrun); --help leaves out the official
    launcher's flags it refuses (still parsed, so the refusal names them)."""
    p = Parser(description=description, parents=[data_parser(), model_parser(), dist_parser()],
               formatter_class=_formatter)
    for action in p._actions if not spawns else ():
        if action.dest in ("multiprocessing_distributed", "nproc"):
            action.help = argparse.SUPPRESS
    _add_eval_common(p)
    if batch is not None:
        p.add_argument("-b", "--batch-size", default=batch, type=int, help="feature-extraction batch")
    return p


def build_linear_parser() -> argparse.ArgumentParser:
    """eval_linear.py: the official linear-classification protocol (eval_cls_imagenet.py) and a cached mode."""
    p = eval_command_parser("Linear probe on frozen features (official protocol: SGD lr 5, wd 0, 100 epochs, /10 at "
                            "60, 80)", batch=None)
    g = p.add_argument_group("linear classifier (official defaults)")
    _add_sgd_args(g, epochs=100, lr=5.0, schedule=[60, 80], weight_decay=0.0)
    g.add_argument("--cos", action=argparse.BooleanOptionalAction, default=False, help="cosine lr schedule instead")
    g.add_argument("-p", "--print-freq", default=10, type=int, metavar="N", help="progress-bar refresh (steps)")
    g.add_argument("--resume", default="", type=str, metavar="PATH", help="linear checkpoint to resume from")
    g.add_argument("-e", "--evaluate", action="store_true", help="only evaluate --resume's (or --pretrained's) "
                                                                "linear head on the validation split")
    g.add_argument("--id", default="", type=str, help="run name (official flag); names the TensorBoard folder")
    g.add_argument("--num-classes", default=None, type=int, help="default: from the training labels")
    g = p.add_argument_group("fast mode (NOT the paper's protocol)")
    g.add_argument("--cached-features", action="store_true",
                   help="extract frozen features once, then train the linear head on the cached tensor")
    g.add_argument("--cached-views", default=0, type=int,
                   help="with --cached-features: also cache N augmented views (RandomResizedCrop + flip) of each "
                        "training image and draw one per epoch (0: center crops only)")
    return p


def build_svm_parser() -> argparse.ArgumentParser:
    """eval_svm.py: linear SVMs on frozen features, VOC07 full and low-shot (official eval_svm_voc.py)."""
    p = eval_command_parser("Low-shot transfer: one linear SVM per class on frozen, L2-normalised features (VOC07 "
                            "mAP)", batch=None, spawns=False)
    p.set_defaults(dataset="voc07")
    for action in p._actions:  # the SVM benchmarks have their own dataset list
        if action.dest == "dataset":
            action.choices = registry.names("svm")
            action.help = ("voc07: DIR/VOCdevkit/VOC2007; places205: DIR/{trainvalsplit_places205,data/...}; "
                           "mnist/fashion-mnist/kmnist: DIR of the idx files; demo: digits")
    g = p.add_argument_group("SVM (official defaults)")
    g.add_argument("-b", "--batch-size", default=128, type=int, help="feature-extraction batch")
    g.add_argument("--cost", default="0.5", type=str, help="comma-separated SVM costs C; the best is reported")
    g.add_argument("--low-shot", action="store_true", help="k = 1, 2, 4, 8, 16 positives per class, 5 runs each")
    g.add_argument("--shots", default="1,2,4,8,16", type=str, help="the k of --low-shot")
    g.add_argument("--runs", default=5, type=int, help="seeded samples per k with --low-shot")
    g.add_argument("--n-jobs", default=-1, type=int, help="parallel SVMs (joblib; -1: all cores)")
    g.add_argument("--svm-max-iter", default=2000, type=int, help="LinearSVC max_iter (official 2000)")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> RunConfig:
    """Parse ``argv`` with YAML defaults from ``-c/--config`` applied first; every value checked against its
    range (:data:`RANGES`); the seed resolved. Returns the read-only :class:`RunConfig`."""
    pre = Parser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_defaults(parser, known.config))
    args = parser.parse_args(argv)
    check_ranges(parser, args)
    values = vars(args)
    if "seed" in values:  # official: cudnn.deterministic only when a seed is given; our streams need one
        values.update(seed_given=args.seed is not None, seed=0 if args.seed is None else args.seed)
    if "multiprocessing_distributed" in values:  # the official launcher gives each worker its own
        values.setdefault("local_rank", 0)
    if "no_progress" in values and not getattr(sys.stderr, "isatty", lambda: False)():  # a SLURM file, a pipe
        values["no_progress"] = True
    return RunConfig(values)


PATH_SETTINGS = ("data", "class_list", "resume")  # written absolute: the file may be read from anywhere


def resolved_settings(cfg: RunConfig, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """The run's settings as ``-c`` takes them back (EXP_DIR/config.yaml): every flag of ``parser`` (default
    pretraining's) with its value after parsing and validation, under the flag's own key, so the file holds only
    keys ``-c`` accepts. Left out: -c itself and values of None (the flags' own defaults). Paths are absolute."""
    parser = parser or build_pretrain_parser()
    out: dict[str, Any] = {}
    for action in parser._actions:
        key = action.dest
        value = cfg.get(key)
        if key in ("help", "config") or value is None:
            continue
        if key in PATH_SETTINGS and value not in ("", "auto"):
            value = os.path.abspath(value)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def parse_num_cluster(value: Any) -> tuple[int, ...]:
    """'25000,50000,100000' (or a YAML list) -> (25000, 50000, 100000); clear error otherwise (a repeated k too:
    the same granularity twice only doubles its ProtoNCE term)."""
    ks = tuple(parse_list(value, "--num-cluster", int, "25000,50000,100000", lambda k: k >= 2,
                          " is malformed: each k must be an integer >= 2"))
    repeated = sorted({k for k in ks if ks.count(k) > 1})
    if repeated:
        raise PCLError(f"--num-cluster '{value}' repeats k={','.join(map(str, repeated))}: give each granularity "
                       f"once (e.g. {','.join(map(str, sorted(set(ks))))})")
    return ks


def warn_idle_flags(cfg: RunConfig, dataset: str) -> None:
    """One warning line per flag that has no effect in this combination (accepted, as the official code does)."""
    log = logging.getLogger("pcl")
    if cfg.nproc is not None and not cfg.multiprocessing_distributed:
        log.warning("--nproc %d has no effect without --multiprocessing-distributed (it sets how many processes "
                    "that launcher spawns per node; torchrun takes --nproc_per_node)", cfg.nproc)
    idle = [f"--{k} device" for k in ("augment", "decode") if cfg.get(k) == "device"]
    if idle and registry.spec(dataset).in_memory:
        log.warning("%s: no effect with --dataset %s (an in-memory set: its batches are augmented as tensors on the "
                    "training device's side already, nothing is decoded)", " / ".join(idle), dataset)
    if cfg.class_list and not registry.spec(dataset).class_list:
        log.warning("--class-list %s has no effect with --dataset %s (it selects class folders of an ImageFolder "
                    "root)", cfg.class_list, dataset)


def validate_pretrain_args(args: Any) -> RunConfig:
    """Resolve and check what argparse cannot (the granularities, the dataset); raise PCLError naming the flag and
    the fix. Returns the resolved, read-only settings."""
    cfg = RunConfig.of(args)
    dataset = registry.resolve_auto(cfg.dataset, cfg.data, "ImageFolder with train/")
    entry = registry.spec(dataset, "data")
    if cfg.data is not None and not entry.takes_dir:
        dataset = registry.DIR_DATASET  # a positional DIR overrides the built-in (demo) data
    elif cfg.data is None and entry.needs_dir:
        raise PCLError(f"--dataset {dataset} needs {entry.layout} as DIR" + (" (or DIR plus --download)"
                                                                            if entry.download else ""))
    if not cfg.resume and cfg.start_epoch >= cfg.epochs:
        raise PCLError(f"--start-epoch {cfg.start_epoch} is not below --epochs {cfg.epochs}: nothing to train")
    if cfg.overwrite and cfg.resume == "auto":
        raise PCLError("--overwrite with --resume auto: --overwrite starts afresh (the run in --exp-dir is removed), "
                       "--resume auto continues it; give one of them")
    if cfg.lr * cfg.weight_decay >= 2 * (1 + cfg.momentum):  # w <- w (1 - lr wd) (+ momentum): unstable past this
        raise PCLError(f"--wd {cfg.weight_decay:g} with --lr {cfg.lr:g}: the weight decay alone makes every SGD step "
                       f"diverge (lr x wd = {cfg.lr * cfg.weight_decay:.3g} >= 2 (1 + --momentum) = "
                       f"{2 * (1 + cfg.momentum):.3g}); lower --wd or --lr (official: 1e-4 and 0.03)")
    if cfg.proto_chunks > 1 and cfg.pauc:
        raise PCLError("--pauc needs one set of ProtoNCE columns per batch: use it with --proto-chunks 1")
    num_cluster = parse_num_cluster(cfg.num_cluster)
    if cfg.get("wandb"):  # before any work, not after the dataset is read
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise PCLError("--wandb needs the wandb package: pip install wandb (or pip install -e "
                           "\".[wandb]\")") from None
    warn_idle_flags(cfg, dataset)
    return cfg.replace(num_cluster=num_cluster, dataset=dataset)
