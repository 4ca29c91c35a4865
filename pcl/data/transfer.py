"""Transfer benchmarks read from disk, never downloaded: VOC07 (multi-label) and Places205 (single-label), and
the SVM benchmark's splits and loaders (also over the in-memory sets)."""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from pcl import PCLError
from pcl.data.datasets import load_image, load_in_memory, printable
from pcl.data.loaders import FileLoader, TensorLabelledLoader
from pcl.data.registry import spec
from pcl.data.transforms import eval_transform
from pcl.settings import DataSettings, read_text


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_LAYOUT = "DIR/VOCdevkit/VOC2007/{JPEGImages/<id>.jpg, ImageSets/Main/<class>_{trainval,test}.txt}"
PLACES_LAYOUT = ("DIR/trainvalsplit_places205/{train,val}_places205.csv (lines '<relative path> <label>') and "
                 "DIR/data/vision/torralba/deeplearning/images256/<relative path>")


def _open_listed(path: str, dataset: str) -> Image.Image:
    """An image named by a split list; a missing or unreadable one is one error naming it."""
    try:
        return load_image(path)
    except FileNotFoundError:
        raise PCLError(f"{dataset}: the split list names {printable(path)}, which does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise PCLError(f"{dataset}: cannot read {printable(path)} ({type(e).__name__}: {str(e)[:120]})") from None


def _read_lines(path: str) -> list[str]:
    """A split list's lines (UTF-8); an unreadable list is one error naming it and the cause."""
    return read_text(path, "split list", "lines '<image> <label>'").splitlines()


class VOC07(Dataset):
    """PASCAL VOC 2007 classification as the official ``voc.py`` reads it: for each class the file
    ``ImageSets/Main/{class}_{split}.txt`` gives 1 (present), -1 (absent) or 0 (difficult) per image.
    ``labels``: N x 20 float tensor of those values. Items: (image, label row, index)."""

    def __init__(self, root: str, split: str, transform: Callable | None = None) -> None:
        base = os.path.join(root, "VOCdevkit", "VOC2007")
        self.image_dir, main = os.path.join(base, "JPEGImages"), os.path.join(base, "ImageSets", "Main")
        if not os.path.isdir(self.image_dir) or not os.path.isdir(main):
            raise PCLError(f"VOC2007 not found under {root}: expected {VOC_LAYOUT} "
                           f"(scripts/download_voc07.sh fetches and unpacks it)")
        self.transform, self.classes = transform, list(VOC_CLASSES)
        names: list[str] = []
        table: dict[str, list[float]] = {}
        for c, cls in enumerate(VOC_CLASSES):
            path = os.path.join(main, f"{cls}_{split}.txt")
            if not os.path.isfile(path):
                raise PCLError(f"VOC2007 label file missing: {path} (expected {VOC_LAYOUT})")
            for number, line in enumerate(_read_lines(path), 1):
                parts = line.split()
                if len(parts) < 2:
                    continue
                if parts[-1] not in ("1", "-1", "0"):
                    raise PCLError(f"{path} line {number}: label '{parts[-1]}' is not 1, -1 or 0 "
                                   f"(VOC: present, absent, difficult)")
                if parts[0] not in table:
                    names.append(parts[0])
                    table[parts[0]] = [-1.0] * len(VOC_CLASSES)
                table[parts[0]][c] = float(parts[-1])
        if not names:
            raise PCLError(f"VOC2007 split '{split}' under {root} lists no images")
        self.names = names
        self.labels = torch.tensor([table[n] for n in names])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):

        img = _open_listed(os.path.join(self.image_dir, self.names[index] + ".jpg"), "VOC2007")
        return (self.transform(img) if self.transform else img), self.labels[index], index


class Places205(Dataset):
    """Places205 from the official split lists (single label per image). Items: (image, label, index)."""

    def __init__(self, root: str, split: str, transform: Callable | None = None) -> None:
        csv = os.path.join(root, "trainvalsplit_places205", f"{split}_places205.csv")
        self.image_dir = os.path.join(root, "data", "vision", "torralba", "deeplearning", "images256")
        if not os.path.isfile(csv) or not os.path.isdir(self.image_dir):
            raise PCLError(f"Places205 not found under {root}: expected {PLACES_LAYOUT}")
        self.transform, self.files, labels = transform, [], []
        for number, line in enumerate(_read_lines(csv), 1):
            parts = line.split()
            if len(parts) >= 2:
                if not parts[1].isdigit() or not 0 <= int(parts[1]) < 205:
                    raise PCLError(f"{csv} line {number}: label '{parts[1]}' is not a class number 0-204")
                self.files.append(parts[0])
                labels.append(int(parts[1]))
        if not self.files:
            raise PCLError(f"{csv} lists no images")
        self.targets = torch.tensor(labels)
        self.classes = list(range(205))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):

        img = _open_listed(os.path.join(self.image_dir, self.files[index]), "Places205")
        return (self.transform(img) if self.transform else img), int(self.targets[index]), index


def one_vs_rest(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Single labels N -> an N x C matrix of 1 (the class) / -1 (the others), the VOC label convention."""
    out = torch.full((labels.shape[0], num_classes), -1.0)
    out[torch.arange(labels.shape[0]), labels] = 1.0
    return out


class TensorSplit(NamedTuple):
    """An in-memory labelled split (uint8 images N x 3 x H x W, labels N)."""

    images: torch.Tensor
    labels: torch.Tensor


def _class_count(fixed: int | None, *labels: torch.Tensor) -> int:
    """The dataset table's class count, or (none fixed) one more than the largest label of the splits."""
    return fixed if fixed is not None else int(max(int(y.max()) for y in labels)) + 1


def svm_sets(cfg: DataSettings) -> tuple[Any, torch.Tensor, Any, torch.Tensor, bool]:
    """The SVM benchmark's splits: (train source, N x C train labels, test source, M x C test labels,
    single_label) for a transfer set of the dataset table (center-crop datasets: voc07, places205) or an
    in-memory set (a TensorSplit). C is the table's class count, or the labels' where it fixes none."""
    dataset = spec(cfg.dataset, "svm")
    if dataset.in_memory:
        sets = load_in_memory(cfg)
        tr, te = sets["train_labels"], sets["test_labels"]
        classes = _class_count(dataset.num_classes, tr, te)
        return (TensorSplit(sets["train"], tr), one_vs_rest(tr, classes), TensorSplit(sets["test"], te),
                one_vs_rest(te, classes), True)
    if cfg.data is None:
        raise PCLError(f"no data: give the {cfg.dataset} root DIR, or --dataset demo")
    transform = eval_transform(cfg.image_size)
    read = dataset.load_reader()
    train, test = read(cfg.data, dataset.train_split, transform), read(cfg.data, dataset.test_split, transform)
    if dataset.multi_label:
        return train, train.labels, test, test.labels, False
    classes = _class_count(dataset.num_classes, train.targets, test.targets)
    return train, one_vs_rest(train.targets, classes), test, one_vs_rest(test.targets, classes), True


def svm_loader(source: Any, rows: np.ndarray, cfg: DataSettings, pin_memory: bool = False) -> Any:
    """A loader over ``rows`` of a split from :func:`svm_sets`, in that order, yielding (images, labels,
    position in ``rows``)."""
    if isinstance(source, TensorSplit):
        keep = torch.as_tensor(rows)
        return TensorLabelledLoader(source.images[keep], source.labels[keep], cfg.batch_size)
    loader = FileLoader(Subset(source, rows.tolist()), cfg.batch_size, cfg.workers_per_node, cfg.seed, train=False,
                        pin_memory=pin_memory, timeout_min=cfg.loader_timeout)
    return _SubsetIndex(loader)


class _SubsetIndex:
    """A Subset yields the base dataset's index in its items; map it back to the position in the subset."""

    def __init__(self, loader: FileLoader) -> None:
        self.loader = loader
        rows = loader.loader.dataset.indices
        self.position = {int(r): i for i, r in enumerate(rows)}

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, index in self.loader:
            yield images, labels, torch.tensor([self.position[int(i)] for i in index])
