"""Datasets, augmentations and loaders for pretraining and evaluation.

Two input paths, one interface (loaders that yield ``(im_q, im_k, index)`` for training and
``(images, index)`` for the E-step feature pass):
- files (ImageFolder, CIFAR/STL from disk): the official PIL augmentations in DataLoader workers;
- in-memory uint8 tensors (the built-in demo set, the MNIST family): the same augmentations as batched tensor ops drawn
  from a ``torch.Generator``, because on a small CPU budget PIL augmentation costs more than the model.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pcl import PCLError, distributed as dist_utils

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------
# file datasets (official PIL pipeline)
# ----------------------------------------------------------------------------------------------------
class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U[sigma_min, sigma_max] (SimCLR / MoCo v2), drawn from torch's RNG."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img):
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def pretrain_transform(aug_plus: bool, size: int = 224, min_scale: float = 0.2) -> Callable:
    """MoCo v1 augmentation (default) or MoCo v2 (``aug_plus``), exactly the official lists
    (``min_scale`` of RandomResizedCrop is 0.2 there)."""
    normalize = T.Normalize(MEAN, STD)
    if aug_plus:
        ops = [T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
               T.RandomGrayscale(p=0.2),
               T.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
               T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    else:
        ops = [T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomGrayscale(p=0.2),
               T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    return T.Compose(ops)


def eval_transform(size: int = 224) -> Callable:
    """Center crop for the E-step and evaluation: Resize(256) + CenterCrop(224) at the default size."""
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


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
    if not os.path.isfile(path):
        raise PCLError(f"--class-list {path}: file not found (one class folder name per line)")
    with open(path) as f:
        names = [line.split("#", 1)[0].strip() for line in f]
    names = [n for n in names if n]
    if not names:
        raise PCLError(f"--class-list {path} lists no classes")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise PCLError(f"--class-list {path} lists {n} twice")
        seen.add(n)
    return names


def load_image(path: str) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit and 32-bit grey images (PNG/TIFF modes I;16, I, F) are scaled to 8 bits
    by their range (torchvision's loader clips them to 255: a white picture)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
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


def _image_folder(root: str, split: str, bad_images: str = "fail", classes: Sequence[str] | None = None) -> Dataset:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise PCLError(f"data folder not found: {path} (expected an ImageFolder root: DIR/{split}/<class>/<image>)")
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir() and (classes is None or entry.name in classes):
            try:
                os.listdir(entry.path)
            except PermissionError:
                raise PCLError(f"class folder {printable(entry.path)} cannot be read (permission denied)") from None
    try:
        return SafeImages(ListedImageFolder(path, classes) if classes else tvd.ImageFolder(path, loader=load_image),
                          bad_images)
    except (FileNotFoundError, RuntimeError) as e:
        raise PCLError(f"no images in {path}: {e} (expected DIR/{split}/<class>/<image>)") from None


class SafeImages(Dataset):
    """An ImageFolder whose unreadable files either stop the run with the file's name (``fail``) or are
    replaced by the next readable image with a warning and a running count (``skip``)."""

    def __init__(self, base: tvd.ImageFolder, policy: str = "fail") -> None:
        self.base, self.policy, self.skipped = base, policy, 0
        self.targets, self.classes, self.samples = base.targets, base.classes, base.samples

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


def _torchvision_set(name: str, root: str, split: str, download: bool) -> Dataset:
    """CIFAR-10/100 ('train'/'test') or STL-10 ('train'/'test'/'unlabeled') from disk."""
    try:
        if name == "stl10":
            return tvd.STL10(root, split=split, download=download)
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        return cls(root, train=split == "train", download=download)
    except RuntimeError as e:
        raise PCLError(f"{name} not found under {root}: {e}; put the torchvision files there or pass --download") from None


class ShardSampler(Sampler[int]):
    """Indices rank, rank + W, ... in order: every sample on exactly one rank, no padding (exact gathers)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class FileLoader:
    """A DataLoader whose shuffling and worker seeds are a function of (seed, epoch): resumable exactly."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int, train: bool,
                 pin_memory: bool = False, drop_last: bool | None = None, prefetch_factor: int = 2,
                 persistent_workers: bool = False) -> None:
        rank, world = dist_utils.rank(), dist_utils.world_size()
        self.seed = seed
        drop_last = train if drop_last is None else drop_last
        if train:
            self.sampler: Sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                       seed=seed, drop_last=drop_last)
        else:
            self.sampler = ShardSampler(len(dataset), rank, world)
        self.generator = torch.Generator()
        self.skip, self.step = _SkipSampler(self.sampler), 0
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.skip, num_workers=workers,
                                 pin_memory=pin_memory, drop_last=drop_last, generator=self.generator,
                                 persistent_workers=persistent_workers and workers > 0,
                                 prefetch_factor=prefetch_factor if workers > 0 else None)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed * 100_003 + epoch)
        self.skip.count, self.step = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue mid-epoch: the same sample order minus the batches already trained on. (Worker-side
        augmentation draws are not replayed, so a file dataset resumes the order exactly, not the crops.)"""
        self.step = int(state["step"])
        self.skip.count = self.step * self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        first = self.step
        for i, batch in enumerate(self.loader):
            self.step = first + i + 1
            yield batch
        self.skip.count, self.step = 0, 0


class _SkipSampler(Sampler[int]):
    """Wraps a sampler and drops its first ``count`` indices (set before iterating)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner, self.count = inner, 0

    def __iter__(self) -> Iterator[int]:
        it = iter(self.inner)
        for _ in range(self.count):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(len(self.inner) - self.count, 0)


# ----------------------------------------------------------------------------------------------------
# built-in demo set: scikit-learn's bundled handwritten digits rendered onto 32x32 colour canvases
# ----------------------------------------------------------------------------------------------------
def make_digits_demo(renders_train: int = 4, renders_test: int = 2, size: int = 32, seed: int = 0,
                     test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """Render the 1797 8x8 digits of ``sklearn.datasets.load_digits`` at random scale, position, rotation,
    colours, background texture and noise, so that raw pixels do not separate the classes.

    Train/test are split by source image (no digit appears in both). Returns uint8 images N x 3 x size x
    size and labels for 'train' and 'test', plus 'train_source'/'test_source' ids and '{split}_nuisance':
    N x 9 float, the drawn background RGB, foreground RGB, scale and centre x, y (to measure what features
    or clusters follow besides the digit). Deterministic in seed.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # 1797 x 8 x 8
    labels = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(glyphs), generator=gen)
    n_test = int(round(test_fraction * len(glyphs)))
    out: dict[str, torch.Tensor] = {}
    for split, ids, reps in (("test", order[:n_test], renders_test), ("train", order[n_test:], renders_train)):
        src = ids.repeat_interleave(reps)
        out[split], out[f"{split}_nuisance"] = render_glyphs(glyphs[src], size, gen)
        out[f"{split}_labels"] = labels[src]
        out[f"{split}_source"] = src
    return out


def render_glyphs(glyphs: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw grey glyphs (N x h x w in [0, 1], any h, w) into size x size colour clutter: uint8 images N x 3 x size x
    size and the drawn nuisances N x 9 (background RGB, foreground RGB, scale, centre x, y)."""
    n = glyphs.shape[0]
    u = lambda lo, hi, *shape: torch.empty(*shape).uniform_(lo, hi, generator=gen)  # noqa: E731
    scale = u(0.45, 0.9, n)  # digit side as a fraction of the canvas
    angle = u(-0.3, 0.3, n)
    cx, cy = u(-1, 1, n) * (1 - scale), u(-1, 1, n) * (1 - scale)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, -(cos * cx - sin * cy)], 1),
                         torch.stack([sin, cos, -(sin * cx + cos * cy)], 1)], 1)  # canvas -> glyph coords
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    mask = F.grid_sample(glyphs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fg, bg = u(0, 1, n, 3, 1, 1), u(0, 1, n, 3, 1, 1)
    lum = lambda c: (0.299 * c[:, 0] + 0.587 * c[:, 1] + 0.114 * c[:, 2])[:, None]  # noqa: E731
    weak = (lum(fg) - lum(bg)).abs() < 0.35  # keep the digit visible: push fg away from bg in luminance
    fg = torch.where(weak, torch.where(lum(bg) > 0.5, fg * 0.3, 0.7 + 0.3 * fg), fg)
    mask = ((mask - 0.15) * 2.0).clamp(0, 1)  # crisper strokes than the blurry 8x8 upsampling
    texture = F.interpolate(u(-0.1, 0.1, n, 3, 4, 4), size=(size, size), mode="bilinear", align_corners=False)
    img = bg + texture + (fg - bg) * mask + 0.03 * torch.randn(n, 3, size, size, generator=gen)
    nuisance = torch.cat([bg.flatten(1), fg.flatten(1), scale[:, None], cx[:, None], cy[:, None]], 1)  # N x 9
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), nuisance


# ----------------------------------------------------------------------------------------------------
# the MNIST family (MNIST, Fashion-MNIST, KMNIST) from their idx files, held in memory as uint8
# ----------------------------------------------------------------------------------------------------
MNIST_FAMILY = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}  # --dataset -> torchvision
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IN_MEMORY_SETS = ("demo", *MNIST_FAMILY)  # datasets augmented as batched tensors (TensorAugment)


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
    for folder in (root, os.path.join(root, MNIST_FAMILY[name], "raw")):
        for candidate in (base, base + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def load_mnist_family(name: str, root: str | None, download: bool = False) -> dict[str, torch.Tensor]:
    """MNIST / Fashion-MNIST / KMNIST: {'train', 'test'} uint8 N x 1 x 28 x 28 and '{split}_labels' (long),
    the official 60k/10k split. Reads the four idx files from ``root`` or ``root/<Name>/raw``; with
    ``download`` torchvision fetches them into ``root`` first (never otherwise)."""
    if root is None:
        raise PCLError(f"--dataset {name} needs the folder of its idx files as DIR")
    if download:
        cls = getattr(tvd, MNIST_FAMILY[name])
        cls(root, train=True, download=True)
        cls(root, train=False, download=True)
    out: dict[str, torch.Tensor] = {}
    for split, (images_base, labels_base) in IDX_FILES.items():
        images_path, labels_path = _find_idx(root, name, images_base), _find_idx(root, name, labels_base)
        if images_path is None or labels_path is None:
            missing = images_base if images_path is None else labels_base
            hint = (" `apt-get install dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist;"
                    if name == "fashion-mnist" else "")
            raise PCLError(f"{name} not found under {root}: {missing}[.gz] is missing (expected the four idx files "
                           f"in DIR or DIR/{MNIST_FAMILY[name]}/raw);{hint} or pass --download (torchvision)")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise PCLError(f"{name} {split} split: {images_path} holds {tuple(images.shape)} and {labels_path} "
                           f"{tuple(labels.shape)}; expected N x H x W images and N labels")
        out[split], out[f"{split}_labels"] = images[:, None], labels.long()
    return out


def load_in_memory(args: Any) -> dict[str, torch.Tensor]:
    """The in-memory sets as 3-channel uint8 at ``args.image_size``: {'train', 'train_labels', 'test',
    'test_labels'}. Grey images are expanded to 3 channels (a view: no copy) so the standard backbones and
    checkpoints apply; a size other than the stored one is a bilinear (antialiased) resize, done once."""
    if args.dataset == "demo":
        return make_digits_demo(renders_train=args.demo_renders, size=args.image_size, seed=0)
    sets = load_mnist_family(args.dataset, args.data, getattr(args, "download", False))
    for split in ("train", "test"):
        x = sets[split]
        if x.shape[-1] != args.image_size or x.shape[-2] != args.image_size:
            x = F.interpolate(x.float(), size=(args.image_size, args.image_size), mode="bilinear",
                              antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
        sets[split] = x.expand(-1, 3, -1, -1)
    return sets


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # B x 1 x H x W


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


class TensorAugment:
    """MoCo v1/v2 augmentation on a batch of uint8 tensors, per-sample parameters from a torch.Generator.

    RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3) + flip as one affine resampling; colour jitter
    (brightness, contrast, saturation, hue as a YIQ rotation) in a fixed order; random grayscale; v2's
    Gaussian blur with sigma scaled by size/224. Same distributions as the PIL pipeline up to
    interpolation and jitter order; used for in-memory sets, not for the paper's ImageNet runs.
    """

    def __init__(self, size: int, aug_plus: bool, min_scale: float = 0.2, color: bool = True) -> None:
        self.size, self.aug_plus, self.min_scale, self.color = size, aug_plus, min_scale, color
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = images.float() / 255.0  # B x 3 x H x W
        b = x.shape[0]
        u = lambda lo, hi, *shape: torch.empty(*shape).uniform_(lo, hi, generator=gen)  # noqa: E731
        area = u(self.min_scale, 1.0, b)
        log_ratio = u(math.log(3 / 4), math.log(4 / 3), b)
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx, cy = u(-1, 1, b) * (1 - w), u(-1, 1, b) * (1 - h)
        flip = torch.where(u(0, 1, b) < 0.5, -1.0, 1.0)
        zero = torch.zeros(b)
        theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, [b, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.color and self.aug_plus:  # (color=False: crop + flip only, the linear-probe augmentation)
            apply = u(0, 1, b) < 0.8
            x = torch.where(apply.view(b, 1, 1, 1), self._jitter(x, 0.4, 0.4, 0.4, 0.1, gen), x)
            x = self._grayscale(x, 0.2, gen)
            x = self._blur(x, gen)
        elif self.color:
            x = self._grayscale(x, 0.2, gen)
            x = self._jitter(x, 0.4, 0.4, 0.4, 0.4, gen)
        return (x - self.mean) / self.std

    @staticmethod
    def _grayscale(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        pick = (torch.rand(x.shape[0], generator=gen) < p).view(-1, 1, 1, 1)
        return torch.where(pick, _gray(x).expand_as(x), x)

    @staticmethod
    def _jitter(x: torch.Tensor, bri: float, con: float, sat: float, hue: float, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        f = lambda s: torch.empty(b, 1, 1, 1).uniform_(1 - s, 1 + s, generator=gen)  # noqa: E731
        x = (x * f(bri)).clamp(0, 1)
        m = _gray(x).mean(dim=(2, 3), keepdim=True)
        x = ((x - m) * f(con) + m).clamp(0, 1)
        g = _gray(x)
        x = ((x - g) * f(sat) + g).clamp(0, 1)
        angle = torch.empty(b).uniform_(-hue, hue, generator=gen) * 2 * math.pi
        cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones(b), torch.zeros(b)
        rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                           torch.stack([zero, sin, cos], 1)], 1)  # B x 3 x 3 rotation of the IQ plane
        mat = torch.linalg.inv(_YIQ) @ rot @ _YIQ  # B x 3 x 3 in RGB
        return torch.einsum("bij,bjhw->bihw", mat, x).clamp(0, 1)

    def _blur(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        apply = torch.rand(b, generator=gen) < 0.5
        sigma = torch.empty(b).uniform_(0.1, 2.0, generator=gen) * self.size / 224
        radius = max(1, int(math.ceil(3 * float(sigma.max()))))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # 3B x K
        y = x.reshape(1, 3 * b, *x.shape[2:])
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, kernel[:, None, None, :], groups=3 * b)
        y = F.conv2d(y, kernel[:, None, :, None], groups=3 * b).reshape_as(x)
        return torch.where(apply.view(b, 1, 1, 1), y, x)


class TensorPairLoader:
    """Yields (im_q, im_k, index) from an in-memory uint8 tensor; shuffling and augmentation are seeded by
    (seed, epoch, rank), so an epoch is reproduced exactly on resume. Each rank takes its slice of every
    global batch (batch_size is per process). ``state_dict``/``load_state_dict`` continue mid-epoch exactly."""

    def __init__(self, images: torch.Tensor, batch_size: int, augment: TensorAugment, seed: int) -> None:
        self.images, self.batch_size, self.augment, self.seed = images, batch_size, augment, seed
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.epoch, self.step, self._start = 0, 0, None
        self._aug_gen: torch.Generator | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start = epoch, None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "aug_gen": self._aug_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start = state

    def __len__(self) -> int:
        total = self.images.shape[0] // (self.batch_size * self.world)
        return total - (self._start["step"] if self._start else 0)

    def __iter__(self):
        order_gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self._aug_gen = aug_gen = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 1009 + self.rank)
        perm = torch.randperm(self.images.shape[0], generator=order_gen)
        step = self.batch_size * self.world
        first, total = 0, self.images.shape[0] // step
        if self._start is not None:
            first = self._start["step"]
            aug_gen.set_state(self._start["aug_gen"])
            self._start = None
        for i in range(first, total):
            idx = perm[i * step:(i + 1) * step][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            x = self.images[idx]
            self.step = i + 1
            yield self.augment(x, aug_gen), self.augment(x, aug_gen), idx


class TensorEvalLoader:
    """Yields (normalised images, index) in order over this rank's shard (no padding)."""

    def __init__(self, images: torch.Tensor, batch_size: int, shard: bool = True) -> None:
        self.images, self.batch_size = images, batch_size
        rank, world = (dist_utils.rank(), dist_utils.world_size()) if shard else (0, 1)
        self.indices = torch.arange(rank, images.shape[0], world)
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for s in range(0, len(self.indices), self.batch_size):
            idx = self.indices[s:s + self.batch_size]
            yield (self.images[idx].float() / 255.0 - self.mean) / self.std, idx


# ----------------------------------------------------------------------------------------------------
# what the engine gets
# ----------------------------------------------------------------------------------------------------
@dataclass
class PretrainData:
    train_loader: Any  # yields (im_q, im_k, index); has set_epoch
    eval_loader: Any  # yields (images, index) over this rank's shard of the training set, eval transform
    num_samples: int
    knn: tuple[Any, torch.Tensor, Any, torch.Tensor] | None = None  # bank loader, labels, test loader, labels


def check_expected(args: Any, num_images: int, num_classes: int | None) -> None:
    """A preset's start-up check (--expect-images / --expect-classes): a wrong folder fails in seconds."""
    where = args.data or args.dataset
    expect_images, expect_classes = getattr(args, "expect_images", 0), getattr(args, "expect_classes", 0)
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


def _file_sets(args: Any, labelled: bool) -> tuple[Dataset, Dataset | None]:
    """(train, test) datasets of a file dataset: ImageFolder train/ and val/ (only the --class-list classes when
    given) or torchvision's train/test. ``labelled``: for evaluation (val/ required; STL-10's labelled train
    split) rather than pretraining (val/ optional, for the kNN monitor; STL-10's unlabeled split)."""
    if args.dataset == "imagefolder":
        classes = read_class_list(args.class_list) if getattr(args, "class_list", None) else None
        train, test = _image_folder(args.data, "train", args.bad_images, classes), None
        if labelled or os.path.isdir(os.path.join(args.data, "val")):
            test = _image_folder(args.data, "val", args.bad_images, classes)
            _same_classes(train, test, args.data)
        return train, test
    split = "unlabeled" if args.dataset == "stl10" and not labelled else "train"
    return (_torchvision_set(args.dataset, args.data, split, args.download),
            _torchvision_set(args.dataset, args.data, "test", args.download))


def build_pretrain_data(args: Any) -> PretrainData:
    """Datasets and loaders for ``args.dataset`` with the per-process batch ``args.batch_size``."""
    eval_bs = args.batch_size * 5  # as official: larger batches for the feature pass
    if args.dataset in IN_MEMORY_SETS:
        sets = load_in_memory(args)
        check_expected(args, sets["train"].shape[0], int(sets["train_labels"].max()) + 1)
        train = TensorPairLoader(sets["train"], args.batch_size, TensorAugment(args.image_size, args.aug_plus, args.crop_min_scale),
                                 args.seed)
        knn = (TensorEvalLoader(sets["train"], eval_bs, shard=False), sets["train_labels"],
               TensorEvalLoader(sets["test"], eval_bs, shard=False), sets["test_labels"])
        return PretrainData(train, TensorEvalLoader(sets["train"], eval_bs), sets["train"].shape[0], knn)

    if args.data is None or not os.path.isdir(args.data):
        raise PCLError(f"data folder not found: {args.data}")
    size, pin = args.image_size, torch.cuda.is_available()
    base_train, base_test = _file_sets(args, labelled=False)
    if len(base_train) == 0:
        raise PCLError(f"the training set in {args.data} is empty")
    check_expected(args, len(base_train), len(getattr(base_train, "classes", [])) or None)
    train_set = IndexedDataset(base_train, pretrain_transform(args.aug_plus, size, args.crop_min_scale), two_crops=True)
    eval_set = IndexedDataset(base_train, eval_transform(size))
    make = lambda ds, bs, train: FileLoader(ds, bs, args.workers, args.seed, train, pin,  # noqa: E731
                                            prefetch_factor=args.prefetch_factor,
                                            persistent_workers=args.persistent_workers)
    knn = None
    if base_test is not None and args.dataset != "stl10":
        test_set = IndexedDataset(base_test, eval_transform(size))
        knn = (make(eval_set, eval_bs, False), eval_set.targets, make(test_set, eval_bs, False), test_set.targets)
    return PretrainData(make(train_set, args.batch_size, True), make(eval_set, eval_bs, False), len(base_train), knn)


# ----------------------------------------------------------------------------------------------------
# labelled data for the linear probe (yields images, labels, index)
# ----------------------------------------------------------------------------------------------------
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


class TensorLabelledLoader:
    """(images, labels, index) batches from in-memory uint8 images. ``augment`` (a :class:`TensorAugment`)
    and shuffling are seeded by (seed, epoch, rank); without it, normalised images in order. Every rank
    takes every world-th sample (no padding)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 augment: TensorAugment | None = None, seed: int = 0, shuffle: bool = False) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.augment, self.seed, self.shuffle, self.epoch = augment, seed, shuffle, 0
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        order = torch.arange(n)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return order[self.rank::self.world]

    def __len__(self) -> int:
        return math.ceil(len(self._indices()) / self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 1009 + self.rank + 7)
        indices = self._indices()
        for s in range(0, len(indices), self.batch_size):
            idx = indices[s:s + self.batch_size]
            x = self.images[idx]
            x = self.augment(x, gen) if self.augment is not None else (x.float() / 255.0 - self.mean) / self.std
            yield x, self.labels[idx], idx


@dataclass
class LabelledData:
    train_loader: Any  # training augmentation, shuffled; yields (images, labels, index); has set_epoch
    train_eval_loader: Any  # center crops of the training set, in order (cached features)
    val_loader: Any  # center crops of the validation split
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    augment_loader: Callable[[int], Any] | None = None  # epoch -> augmented pass over the train set, in order

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.val_labels.max())) + 1


def linear_train_transform(size: int = 224, min_scale: float = 0.08) -> Callable:
    """The official linear-probe training augmentation: RandomResizedCrop + horizontal flip."""
    return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def read_subset(train_dir: str, samples: Sequence[tuple[str, int]], list_file: str) -> list[int]:
    """Indices into an ImageFolder's ``samples`` of the images a subset file lists (one per line): a bare
    ImageNet name ``n01440764_10026.JPEG`` (its class folder is the part before '_', the SimCLR/SwAV 1% and
    10% files) or a path relative to the training folder. Every listed file must exist."""
    if not os.path.isfile(list_file):
        raise PCLError(f"subset file not found: {list_file} (one image name per line, e.g. SimCLR's 1percent.txt)")
    where = {os.path.normpath(path): i for i, (path, _) in enumerate(samples)}
    picked = []
    with open(list_file) as f:
        for line in f:
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


class _Relabelled(Dataset):
    """A subset of an (image, label, ...) dataset, re-indexed 0..n-1 (the index is the third item)."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label, _ = self.base[self.indices[i]]
        return img, label, i


def build_labelled_data(args: Any, train_subset: Callable[[Any], list[int]] | None = None) -> LabelledData:
    """Labelled train/val loaders for the linear probe and fine-tuning; ``args.batch_size`` is per process.
    ``train_subset(base_train)`` (optional) picks the training images (e.g. the 1% / 10% ImageNet subsets)."""
    bs, size = args.batch_size, args.image_size
    if args.dataset in IN_MEMORY_SETS:
        sets = load_in_memory(args)
        augment = TensorAugment(size, aug_plus=False, min_scale=args.crop_min_scale, color=False)
        tr, trl, te, tel = sets["train"], sets["train_labels"], sets["test"], sets["test_labels"]
        if train_subset is not None:
            keep = torch.as_tensor(train_subset(trl))
            tr, trl = tr[keep], trl[keep]

        def augment_loader(epoch: int) -> TensorLabelledLoader:
            loader = TensorLabelledLoader(tr, trl, bs * 2, augment, args.seed + 1, shuffle=False)
            loader.set_epoch(epoch)
            return loader

        return LabelledData(TensorLabelledLoader(tr, trl, bs, augment, args.seed, shuffle=True),
                            TensorLabelledLoader(tr, trl, bs * 2), TensorLabelledLoader(te, tel, bs * 2), trl, tel,
                            augment_loader)
    if args.data is None or not os.path.isdir(args.data):
        raise PCLError(f"data folder not found: {args.data}")
    base_train, base_val = _file_sets(args, labelled=True)
    if len(base_train) == 0 or len(base_val) == 0:
        raise PCLError(f"the training or validation split in {args.data} is empty")
    check_expected(args, len(base_train), len(getattr(base_train, "classes", [])) or None)
    pin = torch.cuda.is_available()
    make = lambda ds, b, train: FileLoader(ds, b, args.workers, args.seed, train, pin, drop_last=False,  # noqa: E731
                                           prefetch_factor=args.prefetch_factor,
                                           persistent_workers=args.persistent_workers)
    train_aug = LabelledDataset(base_train, linear_train_transform(size, args.crop_min_scale))
    train_center = LabelledDataset(base_train, eval_transform(size))
    train_labels = train_center.targets
    if train_subset is not None:
        keep = train_subset(base_train)
        train_aug, train_center = _Relabelled(train_aug, keep), _Relabelled(train_center, keep)
        train_labels = train_labels[torch.as_tensor(keep)]
    val = LabelledDataset(base_val, eval_transform(size))

    def augment_loader(epoch: int) -> FileLoader:
        loader = make(train_aug, bs * 2, False)
        loader.set_epoch(epoch)
        return loader

    return LabelledData(make(train_aug, bs, True), make(train_center, bs * 2, False), make(val, bs * 2, False),
                        train_labels, val.targets, augment_loader)


# ----------------------------------------------------------------------------------------------------
# transfer benchmarks: VOC07 (multi-label) and Places205 (single-label), read from disk, never downloaded
# ----------------------------------------------------------------------------------------------------
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
            with open(path) as f:
                for number, line in enumerate(f, 1):
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
        from PIL import Image

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
        with open(csv) as f:
            for number, line in enumerate(f, 1):
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
        from PIL import Image

        img = _open_listed(os.path.join(self.image_dir, self.files[index]), "Places205")
        return (self.transform(img) if self.transform else img), int(self.targets[index]), index


def one_vs_rest(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Single labels N -> an N x C matrix of 1 (the class) / -1 (the others), the VOC label convention."""
    out = torch.full((labels.shape[0], num_classes), -1.0)
    out[torch.arange(labels.shape[0]), labels] = 1.0
    return out
