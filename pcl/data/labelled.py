"""What evaluation gets: labelled train/val loaders for the linear probe, fine-tuning and the feature commands."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pcl import PCLError, distributed as dist_utils
from pcl.data.datasets import LabelledDataset, Relabelled, check_expected, data_root, file_sets, load_in_memory
from pcl.data.loaders import FileLoader, TensorLabelledLoader
from pcl.data.registry import spec
from pcl.data.tensor_augment import TensorAugment
from pcl.settings import DataSettings
from pcl.data.transforms import eval_transform, linear_train_transform


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


def build_labelled_data(cfg: DataSettings, train_subset: Callable[[Any], list[int]] | None = None) -> LabelledData:
    """Labelled train/val loaders for the linear probe and fine-tuning; each process gets its share of ``cfg.batch_size``.
    ``train_subset(base_train)`` (optional) picks the training images (e.g. the 1% / 10% ImageNet subsets)."""
    bs, size = dist_utils.per_process(cfg.batch_size), cfg.image_size
    if spec(cfg.dataset, "data").in_memory:
        sets = load_in_memory(cfg)
        augment = TensorAugment(size, aug_plus=False, min_scale=cfg.crop_min_scale, color=False)
        tr, trl, te, tel = sets["train"], sets["train_labels"], sets["test"], sets["test_labels"]
        if train_subset is not None:
            keep = torch.as_tensor(train_subset(trl))
            tr, trl = tr[keep], trl[keep]

        def augment_loader(epoch: int) -> TensorLabelledLoader:
            loader = TensorLabelledLoader(tr, trl, bs * 2, augment, cfg.seed + 1, shuffle=False)
            loader.set_epoch(epoch)
            return loader

        return LabelledData(TensorLabelledLoader(tr, trl, bs, augment, cfg.seed, shuffle=True),
                            TensorLabelledLoader(tr, trl, bs * 2), TensorLabelledLoader(te, tel, bs * 2), trl, tel,
                            augment_loader)
    data_root(cfg.data, cfg.dataset)
    base_train, base_val = file_sets(cfg, labelled=True)
    if len(base_train) == 0 or len(base_val) == 0:
        raise PCLError(f"the training or validation split in {cfg.data} is empty")
    check_expected(cfg, len(base_train), len(getattr(base_train, "classes", [])) or None)
    pin = torch.cuda.is_available()
    make = lambda ds, b, train: FileLoader(ds, b, cfg.workers, cfg.seed, train,  # noqa: E731
                                           pin, drop_last=False, prefetch_factor=cfg.prefetch_factor,
                                           persistent_workers=cfg.persistent_workers,
                                           timeout_min=cfg.loader_timeout)
    train_aug = LabelledDataset(base_train, linear_train_transform(size, cfg.crop_min_scale))
    train_center = LabelledDataset(base_train, eval_transform(size))
    train_labels = train_center.targets
    if train_subset is not None:
        keep = train_subset(base_train)
        train_aug, train_center = Relabelled(train_aug, keep), Relabelled(train_center, keep)
        train_labels = train_labels[torch.as_tensor(keep)]
    val = LabelledDataset(base_val, eval_transform(size))

    def augment_loader(epoch: int) -> FileLoader:
        loader = make(train_aug, bs * 2, False)
        loader.set_epoch(epoch)
        return loader

    return LabelledData(make(train_aug, bs, True), make(train_center, bs * 2, False), make(val, bs * 2, False),
                        train_labels, val.targets, augment_loader)
