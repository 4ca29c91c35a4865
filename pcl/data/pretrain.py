"""What pretraining gets: the two-crop training loader, the E-step's feature loader, the kNN monitor's sets."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import Subset

from pcl import PCLError, distributed as dist_utils
from pcl.data.datasets import IndexedDataset, check_expected, data_root, file_sets, load_in_memory, sample_fingerprint
from pcl.data.device_input import EncodedImages, EncodedPairs, collate_encoded, collate_encoded_images
from pcl.data.loaders import DeviceAugmentLoader, DeviceEvalLoader, FileLoader, TensorEvalLoader, TensorPairLoader
from pcl.data.registry import spec
from pcl.data.tensor_augment import TensorAugment
from pcl.settings import DataSettings
from pcl.data.transforms import (PretrainCropBoxes, eval_crop_transform, eval_transform, pretrain_crop_transform,
                                 pretrain_transform)


@dataclass
class PretrainData:
    train_loader: Any  # yields (im_q, im_k, index); has set_epoch
    eval_loader: Any  # yields (images, index) over this rank's shard of the training set, eval transform
    num_samples: int
    knn: tuple[Any, torch.Tensor, Any, torch.Tensor] | None = None  # bank loader, labels, test loader, labels
    subset_loader: Callable[[torch.Tensor], Any] | None = None  # indices -> eval_loader over those samples only
    labelled: bool = True  # False: a folder of images without classes (flat, or --unlabelled)
    fingerprint: str = ""  # the sample list's hash (datasets.sample_fingerprint), with more than one process


def build_pretrain_data(cfg: DataSettings, device: torch.device | None = None, knn_wanted: bool = False
                        ) -> PretrainData:
    """Datasets and loaders for ``cfg.dataset``; each process gets its share of the total ``cfg.batch_size``.
    ``knn_wanted``: the kNN monitor or the final report is on (a warning when the data has no labelled test split).

    File datasets with ``--augment device`` and a ``device``: the workers only decode and crop (uint8), the
    training and E-step loaders finish the batches on ``device`` (:class:`DeviceAugmentLoader`,
    :class:`DeviceEvalLoader`: their batches arrive there, augmented and normalised). The kNN monitor's loaders
    stay on the PIL path. In-memory sets ignore ``--augment`` (they are augmented batched already).

    ``--decode device`` (with ``--augment device`` only: a PCLError otherwise) moves the JPEG decoding of the
    training pairs there too: the workers read each file's bytes and header and draw the official crop boxes
    (:class:`EncodedPairs`), the device decodes, crops and resizes (:func:`decode_crops`). Datasets that are not
    image files (CIFAR/STL) keep decoding in the workers, with a warning; the E-step's center crops always do."""
    decode = cfg.decode
    if decode == "device" and cfg.augment != "device":
        raise PCLError("--decode device needs --augment device (the device decodes only the crops it augments); "
                       "add --augment device or drop --decode device")
    batch = dist_utils.per_process(cfg.batch_size)
    eval_bs = batch * 5  # as official: larger batches for the feature pass
    dataset = spec(cfg.dataset, "data")
    if dataset.in_memory:
        sets = load_in_memory(cfg)
        check_expected(cfg, sets["train"].shape[0], int(sets["train_labels"].max()) + 1)
        train = TensorPairLoader(sets["train"], batch, TensorAugment(cfg.image_size, cfg.aug_plus, cfg.crop_min_scale,
                                                                  hue=cfg.hue_space),
                                 cfg.seed)
        knn = (TensorEvalLoader(sets["train"], eval_bs), sets["train_labels"],  # sharded: each rank its part
               TensorEvalLoader(sets["test"], eval_bs), sets["test_labels"])
        return PretrainData(train, TensorEvalLoader(sets["train"], eval_bs), sets["train"].shape[0], knn,
                            lambda idx: TensorEvalLoader(sets["train"], eval_bs, indices=idx),
                            fingerprint=_fingerprint(sets["train"]))

    data_root(cfg.data, cfg.dataset)
    size, pin = cfg.image_size, torch.cuda.is_available()
    on_device = cfg.augment == "device"
    if cfg.hue_space != "hsv" and not (on_device and device is not None):
        logging.getLogger("pcl").warning("--hue-space %s: no effect here: %s goes through torchvision's PIL pipeline "
                                         "(its HSV hue); only the batched augmentation has it (in-memory sets, "
                                         "--augment device)", cfg.hue_space, dataset.title)
    if on_device and device is None:
        logging.getLogger("pcl").warning("--augment device: no training device was passed to build_pretrain_data; "
                                         "augmenting with the official PIL pipeline in the loader workers")
        on_device = False
    if on_device:
        pin = device.type == "cuda"  # pinned uint8 pages: the copy to the GPU runs without blocking
    base_train, base_test = file_sets(cfg, labelled=False)
    if len(base_train) == 0:
        raise PCLError(f"the training set in {cfg.data} is empty")
    check_expected(cfg, len(base_train), len(getattr(base_train, "classes", [])) or None)
    labelled = getattr(base_train, "labelled", True)
    train_set = IndexedDataset(base_train, pretrain_transform(cfg.aug_plus, size, cfg.crop_min_scale), two_crops=True)
    eval_set = IndexedDataset(base_train, eval_transform(size))
    def make(ds: Any, bs: int, train: bool, pinned: bool | None = None, collate_fn: Any = None) -> FileLoader:
        return FileLoader(ds, bs, cfg.workers, cfg.seed, train, pin if pinned is None else pinned,
                          prefetch_factor=cfg.prefetch_factor, persistent_workers=cfg.persistent_workers,
                          timeout_min=cfg.loader_timeout, collate_fn=collate_fn)

    knn = None
    if base_test is not None and dataset.pretrain_labelled:  # the monitor's bank is the (labelled) training split
        test_set = IndexedDataset(base_test, eval_transform(size))
        knn = (make(eval_set, eval_bs, False), eval_set.targets, make(test_set, eval_bs, False), test_set.targets)
    elif knn_wanted and not labelled:
        logging.getLogger("pcl").info("no kNN/NMI report: the images in %s have no classes", cfg.data)
    elif knn_wanted:
        why = (f"{dataset.title}'s pretraining split is unlabeled" if not dataset.pretrain_labelled
               else f"{os.path.join(cfg.data, dataset.test_split)} does not exist")
        logging.getLogger("pcl").warning("--knn-eval / --knn-every have no effect: the kNN monitor needs a labelled "
                                         "test split and %s", why)
    if on_device:
        augment = TensorAugment(size, cfg.aug_plus, cfg.crop_min_scale, crop=False, hue=cfg.hue_space)
        if decode == "device" and not hasattr(base_train, "samples"):
            logging.getLogger("pcl").warning("--decode device: %s is not a folder of image files; its images are "
                                             "decoded in the loader workers", dataset.title)
            decode = "cpu"
        if decode == "device":  # bytes and boxes from the workers (nothing to pin: decode_jpeg reads host memory)
            pairs = EncodedPairs(base_train, PretrainCropBoxes(size, cfg.crop_min_scale))
            train = DeviceAugmentLoader(make(pairs, batch, True, pinned=False, collate_fn=collate_encoded), augment,
                                        device, cfg.seed, decode_size=size)
        else:
            crops = IndexedDataset(base_train, pretrain_crop_transform(size, cfg.crop_min_scale), two_crops=True)
            train = DeviceAugmentLoader(make(crops, batch, True), augment, device, cfg.seed)
        if decode == "device":  # the E-step's centre crops decoded on the device too
            centre_set, decode_size = EncodedImages(base_train, eval_crop_transform(size)), size
            centre = lambda ds: make(ds, eval_bs, False, pinned=False, collate_fn=collate_encoded_images)  # noqa: E731
        else:
            centre_set, decode_size = IndexedDataset(base_train, eval_crop_transform(size)), None
            centre = lambda ds: make(ds, eval_bs, False)  # noqa: E731
        return PretrainData(train, DeviceEvalLoader(centre(centre_set), device, decode_size), len(base_train), knn,
                            lambda idx: DeviceEvalLoader(centre(Subset(centre_set, idx.tolist())), device,
                                                         decode_size), labelled, _fingerprint(base_train))
    return PretrainData(make(train_set, batch, True), make(eval_set, eval_bs, False), len(base_train), knn,
                        lambda idx: make(Subset(eval_set, idx.tolist()), eval_bs, False), labelled,
                        _fingerprint(base_train))


def _fingerprint(train: Any) -> str:
    """The sample list's hash where processes must agree on it (none needed in one process)."""
    return sample_fingerprint(train) if dist_utils.world_size() > 1 else ""
