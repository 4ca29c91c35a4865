"""Datasets: index wrappers, ImageFolder (safe, class lists), torchvision sets, the MNIST family's idx files,
the in-memory sets, labelled subsets, and the start-up checks of a dataset."""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import math
import os
import stat
import struct
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import Dataset

from pcl import PCLError, distributed as dist_utils
from pcl.data.demo import make_digits_demo
from pcl.data.registry import DatasetSpec, spec
from pcl.data.unlabelled import UnlabelledImages, folder_contents, images_under, training_folder
from pcl.settings import DataSettings, DistSettings, cannot_read, read_text


class IndexedDataset(Dataset):
    """Wrap a (image, label) dataset: returns (view_1, view_2, index) with ``two_crops``, else (image, index)."""

    def __init__(self, base: Dataset, transform: Callable, two_crops: bool = False) -> None:
        self.base, self.transform, self.two_crops = base, transform, two_crops

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img = self.base[index][0]
        if self.two_crops:
            return self.transform(img), self.transform(img), index
        return self.transform(img), index

    @property
    def targets(self) -> torch.Tensor:
        raw = getattr(self.base, "targets", None)
        if raw is None:
            raw = getattr(self.base, "labels")
        return torch.as_tensor(list(raw), dtype=torch.long)


def read_class_list(path: str) -> list[str]:
    """Class folder names (e.g. ImageNet wnids), one per line, in label order; blank lines and '#' comments
    are skipped. A missing or empty file, or a name listed twice, is a PCLError."""
    text = read_text(path, "--class-list", "one class folder name per line")
    names = [n for n in (line.split("#", 1)[0].strip() for line in text.splitlines()) if n]
    if not names:
        raise PCLError(f"--class-list {path} lists no classes")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise PCLError(f"--class-list {path} lists {n} twice")
        seen.add(n)
    return names


def open_regular(path: str) -> Any:
    """``open(path, "rb")``, except that a FIFO, socket or device named like an image is an OSError instead of a
    read that blocks for ever (opened without blocking, then checked: one fstat, no second lookup)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device named like an image)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_image(path: str) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit and 32-bit grey images (PNG/TIFF modes I;16, I, F) are scaled to 8 bits
    by their range (torchvision's loader clips them to 255: a white picture); a float image (F) whose values all
    lie in [0, 1] follows the float convention, 1.0 = white."""
    with open_regular(path) as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and arr.max() <= 1.0 else 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255.0).round().clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def printable(path: str) -> str:
    """A file name that any log stream can write (undecodable bytes as \\x escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class ListedImageFolder(tvd.ImageFolder):
    """An ImageFolder restricted to the listed class folders, labelled 0..C-1 in the list's order (so the same
    list gives the same labels in every split); only those folders are scanned."""

    def __init__(self, root: str, classes: Sequence[str]) -> None:
        self.listed = list(classes)
        super().__init__(root, loader=load_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        missing = [c for c in self.listed if not os.path.isdir(os.path.join(directory, c))]
        if missing:
            raise PCLError(f"class {missing[0]} of the class list is not a folder in {directory} "
                           f"({len(missing)} of the {len(self.listed)} listed classes are missing)")
        return list(self.listed), {c: i for i, c in enumerate(self.listed)}


def image_folder(root: str, split: str, bad_images: str = "fail", classes: Sequence[str] | None = None) -> Dataset:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise PCLError(f"data folder not found: {path} (expected an ImageFolder root: DIR/{split}/<class>/<image>)")
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise cannot_read(printable(path), e) from None
    for entry in entries:
        if entry.is_dir() and (classes is None or entry.name in classes):
            try:
                os.listdir(entry.path)
            except PermissionError:
                raise PCLError(f"class folder {printable(entry.path)} cannot be read (permission denied)") from None
            _scan_class_folder(entry.path)
    try:
        return SafeImages(ListedImageFolder(path, classes) if classes else tvd.ImageFolder(path, loader=load_image),
                          bad_images)
    except (FileNotFoundError, RuntimeError) as e:
        raise PCLError(f"no images in {path}: {e} (expected DIR/{split}/<class>/<image>)") from None


def _scan_class_folder(folder: str) -> None:
    """Every folder under a class folder, as ImageFolder walks it (following links): an unreadable one, or a linked
    folder that leads back to itself or an ancestor (a loop: ImageFolder would list the same images again at every
    level until the path grows too long), is one PCLError naming it."""
    stack = [(folder, (os.path.realpath(folder),))]
    while stack:
        path, ancestors = stack.pop()
        try:
            subdirs = [e for e in os.scandir(path) if e.is_dir()]
        except OSError as e:
            raise cannot_read(printable(path), e) from None
        for entry in subdirs:
            real = os.path.realpath(entry.path)
            if entry.is_symlink() and real in ancestors:
                raise PCLError(f"{printable(entry.path)} links back to {printable(real)} (a symlink loop: its images "
                               f"would be listed again and again); remove the link or point it elsewhere")
            stack.append((entry.path, ancestors + (real,)))


class SafeImages(Dataset):
    """An ImageFolder whose unreadable files either stop the run with the file's name (``fail``) or are
    replaced by the next readable image with a warning and a running count (``skip``)."""

    def __init__(self, base: tvd.ImageFolder, policy: str = "fail") -> None:
        self.base, self.policy, self.skipped = base, policy, 0
        self.targets, self.classes, self.samples = base.targets, base.classes, base.samples
        self.labelled = getattr(base, "labelled", True)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        for attempt in range(len(self.base)):
            i = (index + attempt) % len(self.base)
            try:
                return self.base[i]
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # corrupt, truncated, bomb
                path = printable(self.base.samples[i][0])
                if self.policy != "skip":
                    raise PCLError(f"cannot read image {path} ({type(e).__name__}: {str(e)[:120]}); fix or remove "
                                   f"it, or pass --bad-images skip") from None
                self.skipped += 1
                logging.getLogger("pcl").warning("unreadable image %s skipped (%d so far in this process)",
                                                 path, self.skipped)
        raise PCLError(f"no readable image in {self.base.root}")


def _torchvision_set(s: DatasetSpec, root: str, split: str, download: bool) -> Dataset:
    """One split of a torchvision set from disk (CIFAR-10/100: 'train'/'test'; STL-10: also 'unlabeled'), its
    class and split keyword as the table gives them."""
    cls = getattr(tvd, s.torchvision)
    try:
        with _download_errors(s.name, root) if download else contextlib.nullcontext():
            if s.split_keyword == "split":
                return cls(root, split=split, download=download)
            return cls(root, train=split == "train", download=download)
    except PCLError:
        raise
    except RuntimeError as e:
        raise PCLError(f"{s.name} not found under {root}: {e}; put the torchvision files there or pass --download") from None


@contextlib.contextmanager
def _download_errors(name: str, root: str) -> Iterator[None]:
    """torchvision's --download failures (no network, a proxy, a full disk: URLError/OSError, or its RuntimeError
    'Error downloading ...') as one line naming the set and the folder."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "download" not in str(e).lower():
            raise
        why = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:160]
        raise PCLError(f"--download {name} into {root} failed ({why}): without a network, fetch the files elsewhere "
                       f"and put them there (then drop --download)") from None


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> torch.Tensor:
    """An idx file of unsigned bytes (gzipped when the name ends in .gz) as a uint8 tensor of its dimensions.

    Format (LeCun's): two zero bytes, type 0x08 (ubyte), the number of dimensions n, n big-endian uint32
    sizes, then the data. Anything else is a PCLError naming the file and what is wrong.
    """
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise PCLError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise PCLError(f"{path} is not an idx file of unsigned bytes (header {raw[:4].hex() or 'empty'}, expected "
                       f"0000 08 then the number of dimensions); re-download it or check the folder")
    ndim, start = raw[3], 4 + 4 * raw[3]
    if len(raw) < start:
        raise PCLError(f"{path} is truncated inside its header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    if math.prod(dims) == 0:
        raise PCLError(f"{path} is empty (its header says {' x '.join(map(str, dims))}); re-download it or check the "
                       f"folder")
    if len(raw) - start != math.prod(dims):
        raise PCLError(f"{path}: the header says {' x '.join(map(str, dims))} = {math.prod(dims)} bytes of data, "
                       f"the file holds {len(raw) - start}; it is truncated or corrupt, re-download it")
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).reshape(dims)


def write_idx(path: str, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an idx file (gzipped when the name ends in .gz): the inverse of :func:`read_idx`."""
    data = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    with (gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")) as f:
        f.write(header + data.numpy().tobytes())


def _find_idx(root: str, name: str, base: str) -> str | None:
    """``base`` or ``base.gz`` in ``root`` (the original distribution, Debian's package) or in
    ``root/<TorchvisionName>/raw`` (torchvision's layout); None if absent."""
    for folder in (root, os.path.join(root, spec(name).torchvision, "raw")):
        for candidate in (base, base + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def load_mnist_family(name: str, root: str | None, download: bool = False) -> dict[str, torch.Tensor]:
    """MNIST / Fashion-MNIST / KMNIST: {'train', 'test'} uint8 N x 1 x 28 x 28 and '{split}_labels' (long),
    the official 60k/10k split. Reads the four idx files from ``root`` or ``root/<Name>/raw``; with
    ``download`` torchvision fetches them into ``root`` first (never otherwise). The torchvision name, the class
    count and the hint where to get the files come from the dataset table."""
    s = spec(name)
    if root is None:
        raise PCLError(f"--dataset {name} needs {s.layout} as DIR")
    if download and s.download:
        cls = getattr(tvd, s.torchvision)
        with _download_errors(s.name, root):
            cls(root, train=True, download=True)
            cls(root, train=False, download=True)
    out: dict[str, torch.Tensor] = {}
    for split, (images_base, labels_base) in IDX_FILES.items():
        images_path, labels_path = _find_idx(root, name, images_base), _find_idx(root, name, labels_base)
        if images_path is None or labels_path is None:
            missing = images_base if images_path is None else labels_base
            raise PCLError(f"{name} not found under {root}: {missing}[.gz] is missing (expected the four idx files "
                           f"in DIR or DIR/{s.torchvision}/raw);{s.missing_hint} or pass --download (torchvision)")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise PCLError(f"{name} {split} split: {images_path} holds {tuple(images.shape)} and {labels_path} "
                           f"{tuple(labels.shape)}; expected N x H x W images and N labels")
        if labels.numel() and int(labels.max()) >= s.num_classes:
            bad = int(labels.max())
            raise PCLError(f"{labels_path}: label {bad} (image {int((labels == bad).nonzero()[0])}) is outside the "
                           f"{s.num_classes} classes 0-{s.num_classes - 1} of {name}; the file is corrupt or not {name}'s")
        out[split], out[f"{split}_labels"] = images[:, None], labels.long()
    return out


def data_settings(cfg: Mapping[str, Any]) -> DataSettings:
    """The data group of a resolved command line (any entry point's), with this process's loader workers: call it
    once the process group is up (``distributed.init``), when -j is divided among the node's processes."""
    return DataSettings.of(cfg, dist_utils.loader_workers(cfg["workers"], DistSettings.of(cfg)))


def demo_sets(s: DatasetSpec, cfg: DataSettings) -> dict[str, torch.Tensor]:
    """The table's reader of --dataset demo: the digits rendered at ``cfg.image_size`` (deterministic)."""
    return make_digits_demo(renders_train=cfg.demo_renders, size=cfg.image_size, seed=0)


def idx_sets(s: DatasetSpec, cfg: DataSettings) -> dict[str, torch.Tensor]:
    """The table's reader of the MNIST family: the idx files in DIR (``--download``: fetched first)."""
    return load_mnist_family(s.name, cfg.data, cfg.download)


def load_in_memory(cfg: DataSettings) -> dict[str, torch.Tensor]:
    """The in-memory sets as 3-channel uint8 at ``cfg.image_size``: {'train', 'train_labels', 'test',
    'test_labels'}, read by the table's reader of ``cfg.dataset``. Grey images are expanded to 3 channels (a
    view: no copy) so the standard backbones and checkpoints apply; a size other than the stored one is a
    bilinear (antialiased) resize, done once."""
    s = spec(cfg.dataset)
    if not s.in_memory:
        raise PCLError(f"--dataset {s.name} is read from files, not held in memory: use file_sets for it")
    sets = s.load_reader()(s, cfg)
    for split in ("train", "test"):
        x = sets[split]
        if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            x = F.interpolate(x.float(), size=(cfg.image_size, cfg.image_size), mode="bilinear",
                              antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
        if x.shape[1] != 3:
            x = x.expand(-1, 3, -1, -1)
        sets[split] = x
    return sets


def data_root(path: str | None, dataset: str) -> str:
    """DIR of a file dataset, checked: given, and a folder (a file or a missing path is one line saying which)."""
    s = spec(dataset)
    if path is None:
        raise PCLError(f"--dataset {dataset} needs {s.layout} as DIR")
    if os.path.exists(path) and not os.path.isdir(path):
        raise PCLError(f"DIR {printable(path)} is a file, not a folder: --dataset {dataset} needs {s.layout}")
    if not os.path.isdir(path):
        raise PCLError(f"data folder not found: {printable(path)} (--dataset {dataset} needs {s.layout})")
    return path


def check_expected(cfg: DataSettings, num_images: int, num_classes: int | None) -> None:
    """A preset's start-up check (--expect-images / --expect-classes): a wrong folder fails in seconds."""
    where = cfg.data or cfg.dataset
    expect_images, expect_classes = cfg.expect_images, cfg.expect_classes
    if expect_images and num_images != expect_images:
        raise PCLError(f"{where}: {num_images} training images, the preset expects {expect_images}; is DIR the "
                       f"right folder? (--expect-images 0 turns this check off)")
    if expect_classes and num_classes is not None and num_classes != expect_classes:
        raise PCLError(f"{where}: {num_classes} classes, the preset expects {expect_classes}; is DIR (or "
                       f"--class-list) right? (--expect-classes 0 turns this check off)")


def _same_classes(train: Dataset, val: Dataset, root: str) -> None:
    """Labels are class positions: a validation folder with other classes would be scored against wrong labels."""
    a, b = list(getattr(train, "classes", [])), list(getattr(val, "classes", []))
    if a != b:
        only = sorted(set(a) ^ set(b))[:3]
        raise PCLError(f"{root}: train/ and val/ hold different classes ({len(a)} vs {len(b)}; e.g. {only or 'other order'}); "
                       f"make them agree or give --class-list FILE")


def imagefolder_sets(s: DatasetSpec, cfg: DataSettings, labelled: bool) -> tuple[Dataset, Dataset | None]:
    """The table's reader of --dataset imagefolder: DIR/train/ and DIR/val/ (only the --class-list classes when
    given, labelled alike in both). val/ is required for evaluation, optional for pretraining (the kNN monitor).
    Pretraining also takes images without classes (:func:`unlabelled_set`)."""
    unlabelled = unlabelled_set(cfg) if not labelled else None
    if unlabelled is not None:
        return unlabelled, None
    if labelled and cfg.unlabelled:
        raise PCLError("--unlabelled: this evaluation scores class labels; give it DIR/train/<class>/<image> and "
                       "DIR/val/<class>/<image> without --unlabelled")
    classes = read_class_list(cfg.class_list) if cfg.class_list else None
    train, test = image_folder(cfg.data, s.train_split, cfg.bad_images, classes), None
    if labelled or os.path.isdir(os.path.join(cfg.data, s.test_split)):
        test = image_folder(cfg.data, s.test_split, cfg.bad_images, classes)
        _same_classes(train, test, cfg.data)
    return train, test


def unlabelled_set(cfg: DataSettings) -> Dataset | None:
    """Pretraining images without classes, or None when DIR is a labelled ImageFolder: a flat folder (image files
    and no subfolders in DIR/train/, or in DIR when it has no train/), or with --unlabelled every image under that
    folder, its subfolders carrying no class. Unreadable files as --bad-images says (:class:`SafeImages`)."""
    if cfg.data is None or not os.path.isdir(cfg.data):
        return None
    folder = training_folder(cfg.data)
    try:
        images, folders = folder_contents(folder)
    except OSError as e:
        raise cannot_read(printable(folder), e) from None
    if cfg.unlabelled:
        _scan_class_folder(folder)  # unreadable folders and symlink loops: one line naming them
        images = images_under(folder)
    elif folders or not images:
        return None
    if cfg.class_list:
        raise PCLError(f"--class-list {cfg.class_list} selects class folders, and the images in {folder} have no "
                       f"classes; drop --class-list")
    return SafeImages(UnlabelledImages(folder, images, load_image), cfg.bad_images)


def torchvision_sets(s: DatasetSpec, cfg: DataSettings, labelled: bool) -> tuple[Dataset, Dataset]:
    """The table's reader of the torchvision sets: the pretraining split (STL-10's unlabeled one) or, ``labelled``,
    the labelled training split, and the test split."""
    split = s.train_split if labelled else s.pretrain_split
    return (_torchvision_set(s, cfg.data, split, cfg.download),
            _torchvision_set(s, cfg.data, s.test_split, cfg.download))


def file_sets(cfg: DataSettings, labelled: bool) -> tuple[Dataset, Dataset | None]:
    """(train, test) datasets of a file dataset, from the table's reader of ``cfg.dataset``. ``labelled``: for
    evaluation (a labelled train split and a test split required) rather than pretraining (the split it trains
    on, e.g. STL-10's unlabeled one; a test split where there is one, for the kNN monitor)."""
    s = spec(cfg.dataset, "data")
    return s.load_reader()(s, cfg, labelled)


class LabelledDataset(Dataset):
    """(transformed image, label, index) from an (image, label) dataset."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img, label = self.base[index][:2]
        return self.transform(img), label, index

    @property
    def targets(self) -> torch.Tensor:
        return IndexedDataset(self.base, self.transform).targets


def read_subset(train_dir: str, samples: Sequence[tuple[str, int]], list_file: str) -> list[int]:
    """Indices into an ImageFolder's ``samples`` of the images a subset file lists (one per line): a bare
    ImageNet name ``n01440764_10026.JPEG`` (its class folder is the part before '_', the SimCLR/SwAV 1% and
    10% files) or a path relative to the training folder. Every listed file must exist."""
    lines = read_text(list_file, "subset", "one image name per line, e.g. SimCLR's 1percent.txt").splitlines()
    where = {os.path.normpath(path): i for i, (path, _) in enumerate(samples)}
    picked = []
    for line in lines:
        name = line.strip()
        if not name:
            continue
        rel = name if "/" in name else os.path.join(name.split("_")[0], name)
        path = os.path.normpath(os.path.join(train_dir, rel))
        if path not in where:
            raise PCLError(f"{list_file} lists {name}, which is not in {train_dir} (expected {path})")
        picked.append(where[path])
    if not picked:
        raise PCLError(f"subset file {list_file} lists no images")
    return picked


def per_class_fraction(labels: torch.Tensor, percent: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded ``percent``% sample of each class (at least one image per class)."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        take = max(1, int(round(len(members) * percent / 100)))
        picked.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.cat(picked).sort().values


class Relabelled(Dataset):
    """A subset of an (image, label, ...) dataset, re-indexed 0..n-1 (the index is the third item)."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label, _ = self.base[self.indices[i]]
        return img, label, i


def sample_fingerprint(data: Any) -> str:
    """A short hash of a training set's sample list, for checking that every process sees the same one: an image
    folder's (path relative to its root, label) of every image, in order; a tensor's shape and bytes; otherwise
    the number of samples and their labels. Differs when a file is missing or extra on one process."""
    import hashlib

    h = hashlib.sha256()
    if torch.is_tensor(data):
        h.update(repr(tuple(data.shape)).encode())
        h.update(data.contiguous().cpu().numpy().tobytes())
    elif hasattr(data, "samples"):
        root = getattr(getattr(data, "base", data), "root", "")
        rows = (f"{os.path.relpath(path, root) if root else path}\t{label}" for path, label in data.samples)
        h.update("\n".join(rows).encode("utf-8", "surrogateescape"))
    else:
        labels = getattr(data, "targets", None)
        labels = getattr(data, "labels", None) if labels is None else labels
        h.update(f"{len(data)}:{list(labels) if labels is not None else ''}".encode())
    return h.hexdigest()[:16]
