"""The dataset table: every ``--dataset`` value and the facts the rest of the code asks about it.

Adding a dataset is one :class:`DatasetSpec` entry in :data:`DATASETS` (plus its reader, when no existing one
fits): the parsers' ``--dataset`` choices, the flag checks, the pretraining / evaluation / SVM data paths and the
kNN monitor all read the table instead of comparing names.

Readers are named as ``"module:function"`` strings (or given as callables), resolved only when data is read, so
this module stays at the bottom of the layers while the readers live in :mod:`pcl.data.datasets` and
:mod:`pcl.data.transfer`. Their call, by ``storage`` and by where the set is offered:

- ``"memory"``: ``reader(spec, cfg: DataSettings) -> {'train', 'train_labels', 'test', 'test_labels'}``, uint8 images
  N x C x H x W (C 1 or 3) and long labels; :func:`pcl.data.datasets.load_in_memory` brings them to 3 channels
  at ``--image-size``. They are augmented as batched tensors.
- ``"files"`` offered to the shared data flags (``"data"``): ``reader(spec, cfg: DataSettings, labelled) -> (train, test or
  None)``, datasets of (PIL image, label); ``labelled`` picks the evaluation splits rather than pretraining's.
- ``"files"`` offered to ``eval_svm`` only (the transfer benchmarks): ``reader(root, split, transform)``, a
  dataset of (image, label, index) with ``.labels`` (N x C, ``multi_label``) or ``.targets``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from pcl import PCLError

AUTO = "auto"  # --dataset auto: the ImageFolder at DIR (DIR_DATASET); not a table entry
DIR_DATASET = "imagefolder"  # what a bare DIR is read as: --dataset auto, or a DIR given to a set that takes none
PARSERS = ("data", "svm")  # "data": the shared data flags (pretraining, linear, kNN, ...); "svm": eval_svm


@dataclass(frozen=True)
class DatasetSpec:
    """The facts of one ``--dataset`` value. Defaults are those of a labelled train/test set read from DIR."""

    name: str  # the --dataset value
    title: str  # the name messages use ("STL-10")
    storage: str  # "memory" (uint8 tensors, batched augmentation) or "files" (per-image reads in loader workers)
    layout: str  # what DIR holds, as messages say it: "--dataset NAME needs {layout} as DIR"
    reader: str | Callable[..., Any]  # "module:function" or a callable; see the module docstring for its call
    parsers: tuple[str, ...] = ("data",)  # which --dataset lists offer it (PARSERS)
    train_split: str = "train"  # the labelled training split (evaluation)
    pretrain_split: str = "train"  # the split pretraining trains on (STL-10: its unlabeled 100k)
    test_split: str = "test"  # the labelled test / validation split
    pretrain_labelled: bool = True  # the pretraining split has labels: the kNN monitor can use it as its bank
    num_classes: int | None = None  # fixed by the dataset; None: from the class folders or the labels
    multi_label: bool = False  # labels are N x C rows of 1 / -1 / 0 (VOC) rather than one class per image
    download: bool = False  # --download lets torchvision fetch it into DIR
    needs_dir: bool = False  # a missing DIR is refused when the flags are checked, before anything is built
    takes_dir: bool = True  # False: the set is built in (demo); a DIR given with it is read as DIR_DATASET
    class_list: bool = False  # --class-list selects its class folders
    torchvision: str | None = None  # torchvision.datasets class (download; the MNIST family's DIR/<Name>/raw)
    split_keyword: str = "train"  # how that class takes a split: "split" (split=NAME), "train" (train=NAME == "train")
    missing_hint: str = ""  # appended to the "not found" error of its files (where to get them)
    svm_metric: str = "mAP"  # what eval_svm reports: "mAP" (over classes) or "top1"
    svm_low_shot_subset: bool = False  # --low-shot reads only the sampled training images, and scores no full set

    def __post_init__(self) -> None:
        bad = [(field, value) for field, value, valid in (
            ("storage", self.storage, ("memory", "files")),
            ("split_keyword", self.split_keyword, ("split", "train")),
            ("svm_metric", self.svm_metric, ("mAP", "top1"))) if value not in valid]
        bad += [("parsers", p) for p in self.parsers if p not in PARSERS]
        if bad:
            field, value = bad[0]
            raise PCLError(f"dataset table entry {self.name}: {field} {value!r} is not one of the known values "
                           f"(see pcl.data.registry.DatasetSpec)")

    @property
    def in_memory(self) -> bool:
        """Loaded whole as uint8 tensors and augmented in batches (TensorAugment), not read per image."""
        return self.storage == "memory"

    def load_reader(self) -> Callable[..., Any]:
        """The reader function (imported on first use: the readers sit in higher layers than this table)."""
        if callable(self.reader):
            return self.reader
        module, _, attr = self.reader.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise PCLError(f"dataset table entry {self.name}: reader {self.reader!r} cannot be loaded ({e}); "
                           f"name it as 'package.module:function'") from None


_MNIST_LAYOUT = "the folder of its idx files"
_MNIST = dict(storage="memory", layout=_MNIST_LAYOUT, reader="pcl.data.datasets:idx_sets", parsers=("data", "svm"),
              num_classes=10, download=True, needs_dir=True)

# The order is the order of the parsers' choices (each parser lists the entries it is offered in this order).
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("voc07", "VOC2007", "files", "the folder holding VOCdevkit/VOC2007", "pcl.data.transfer:VOC07",
                parsers=("svm",), train_split="trainval", num_classes=20, multi_label=True),
    DatasetSpec("places205", "Places205", "files",
                "the folder holding trainvalsplit_places205/ and data/vision/torralba/deeplearning/images256/",
                "pcl.data.transfer:Places205", parsers=("svm",), test_split="val", num_classes=205,
                svm_metric="top1", svm_low_shot_subset=True),
    DatasetSpec("imagefolder", "ImageFolder", "files", "an ImageFolder root (train/<class>/<image>, and val/)",
                "pcl.data.datasets:imagefolder_sets", test_split="val", class_list=True),
    DatasetSpec("cifar10", "CIFAR-10", "files", "the torchvision root of CIFAR-10 (cifar-10-batches-py/)",
                "pcl.data.datasets:torchvision_sets", num_classes=10, download=True, torchvision="CIFAR10"),
    DatasetSpec("cifar100", "CIFAR-100", "files", "the torchvision root of CIFAR-100 (cifar-100-python/)",
                "pcl.data.datasets:torchvision_sets", num_classes=100, download=True, torchvision="CIFAR100"),
    DatasetSpec("stl10", "STL-10", "files", "the torchvision root of STL-10 (stl10_binary/)",
                "pcl.data.datasets:torchvision_sets", pretrain_split="unlabeled", pretrain_labelled=False,
                num_classes=10, download=True, torchvision="STL10", split_keyword="split"),
    DatasetSpec("mnist", "MNIST", torchvision="MNIST", **_MNIST),
    DatasetSpec("fashion-mnist", "Fashion-MNIST", torchvision="FashionMNIST", **_MNIST,
                missing_hint=" `apt-get install dataset-fashion-mnist` installs them in "
                             "/usr/share/datasets/fashion-mnist;"),
    DatasetSpec("kmnist", "KMNIST", torchvision="KMNIST", **_MNIST),
    DatasetSpec("demo", "the digits demo", "memory",
                "no folder (the digits are rendered from scikit-learn's bundled set)",
                "pcl.data.datasets:demo_sets", parsers=("data", "svm"), num_classes=10, takes_dir=False),
)}


def spec(name: str, parser: str | None = None) -> DatasetSpec:
    """The table entry of ``--dataset name``; with ``parser``, one that parser offers. Anything else is a
    PCLError naming the valid values."""
    entry = DATASETS.get(name)
    if entry is None:
        raise PCLError(f"--dataset {name}: unknown dataset; choose one of {', '.join(DATASETS)} "
                       f"(or add an entry to pcl.data.registry.DATASETS)")
    if parser is not None and parser not in entry.parsers:
        valid = names(parser)
        raise PCLError(f"--dataset {name} cannot be used here; choose one of {', '.join(valid)}")
    return entry


def names(parser: str) -> list[str]:
    """The ``--dataset`` values a parser offers ("data" or "svm"), in table order."""
    return [name for name, entry in DATASETS.items() if parser in entry.parsers]


def resolve_auto(name: str, data: str | None, expected: str) -> str:
    """``--dataset auto`` is the ImageFolder at DIR; without DIR it is one error naming the fix (``expected``: what
    the ImageFolder root must hold). Any other name is returned as it is."""
    if name != AUTO:
        return name
    if data is None:
        raise PCLError(f"no data: give a dataset root DIR ({expected}), or --dataset demo")
    return DIR_DATASET
