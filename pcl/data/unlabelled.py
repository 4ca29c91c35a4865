"""Folders of images without classes, for pretraining: a flat folder (the images directly in DIR/train/, or in DIR
when it has no train/), or with --unlabelled a folder tree whose subfolders carry no class meaning."""

from __future__ import annotations

import os
from typing import Any, Callable

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from pcl import PCLError


def is_image(name: str) -> bool:
    """An image file by its extension, as torchvision's ImageFolder decides (.jpg, .png, .webp, ..., any case)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def training_folder(root: str) -> str:
    """Where pretraining looks for images: DIR/train/ when there is one, else DIR itself."""
    train = os.path.join(root, "train")
    return train if os.path.isdir(train) else root


def folder_contents(folder: str) -> tuple[list[str], list[str]]:
    """(image files directly in ``folder``, its subfolders), sorted by name; hidden entries are left out."""
    images, folders = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            folders.append(entry.path)
        elif entry.is_file() and is_image(entry.name):
            images.append(entry.path)
    return images, folders


def images_under(folder: str) -> list[str]:
    """Every image file under ``folder`` (following links, as ImageFolder does; hidden folders left out), sorted."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(top, f) for f in sorted(files) if not f.startswith(".") and is_image(f)]
    return found


class UnlabelledImages(Dataset):
    """Image files without classes: (image, 0) per file, ``labelled`` False. ``samples``, ``targets`` and ``root``
    as ImageFolder has them, so :class:`pcl.data.datasets.SafeImages` handles its unreadable files alike."""

    labelled = False

    def __init__(self, root: str, files: list[str], loader: Callable[[str], Any]) -> None:
        if not files:
            raise PCLError(f"no images in {root} (files ending in {', '.join(IMG_EXTENSIONS)})")
        self.root, self.loader = root, loader
        self.samples = [(path, 0) for path in files]
        self.targets = [0] * len(files)
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.loader(self.samples[index][0]), 0
