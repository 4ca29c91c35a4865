"""What pretraining gets: the two-crop training loader, the E-step's feature loader, the kNN monitor's sets."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from pcl import PCLError, distributed as dist_utils
from pcl.data.datasets import IndexedDataset, check_expected, file_sets, load_in_memory
from pcl.data.loaders import FileLoader, TensorEvalLoader, TensorPairLoader
from pcl.data.registry import spec
from pcl.data.tensor_augment import TensorAugment
from pcl.data.transforms import eval_transform, pretrain_transform


@dataclass
class PretrainData:
    train_loader: Any  # yields (im_q, im_k, index); has set_epoch
    eval_loader: Any  # yields (images, index) over this rank's shard of the training set, eval transform
    num_samples: int
    knn: tuple[Any, torch.Tensor, Any, torch.Tensor] | None = None  # bank loader, labels, test loader, labels


def build_pretrain_data(args: Any) -> PretrainData:
    """Datasets and loaders for ``args.dataset``; each process gets its share of the total ``args.batch_size``."""
    batch = dist_utils.per_process(args.batch_size)
    eval_bs = batch * 5  # as official: larger batches for the feature pass
    dataset = spec(args.dataset, "data")
    if dataset.in_memory:
        sets = load_in_memory(args)
        check_expected(args, sets["train"].shape[0], int(sets["train_labels"].max()) + 1)
        train = TensorPairLoader(sets["train"], batch, TensorAugment(args.image_size, args.aug_plus, args.crop_min_scale),
                                 args.seed)
        knn = (TensorEvalLoader(sets["train"], eval_bs), sets["train_labels"],  # sharded: each rank its part
               TensorEvalLoader(sets["test"], eval_bs), sets["test_labels"])
        return PretrainData(train, TensorEvalLoader(sets["train"], eval_bs), sets["train"].shape[0], knn)

    if args.data is None or not os.path.isdir(args.data):
        raise PCLError(f"data folder not found: {args.data}")
    size, pin = args.image_size, torch.cuda.is_available()
    base_train, base_test = file_sets(args, labelled=False)
    if len(base_train) == 0:
        raise PCLError(f"the training set in {args.data} is empty")
    check_expected(args, len(base_train), len(getattr(base_train, "classes", [])) or None)
    train_set = IndexedDataset(base_train, pretrain_transform(args.aug_plus, size, args.crop_min_scale), two_crops=True)
    eval_set = IndexedDataset(base_train, eval_transform(size))
    make = lambda ds, bs, train: FileLoader(ds, bs, dist_utils.loader_workers(args), args.seed, train,  # noqa: E731
                                            pin, prefetch_factor=args.prefetch_factor,
                                            persistent_workers=args.persistent_workers,
                                            timeout_min=args.loader_timeout)
    knn = None
    if base_test is not None and dataset.pretrain_labelled:  # the monitor's bank is the (labelled) training split
        test_set = IndexedDataset(base_test, eval_transform(size))
        knn = (make(eval_set, eval_bs, False), eval_set.targets, make(test_set, eval_bs, False), test_set.targets)
    elif args.knn_eval or args.knn_every:
        why = (f"{dataset.title}'s pretraining split is unlabeled" if not dataset.pretrain_labelled
               else f"{os.path.join(args.data, dataset.test_split)} does not exist")
        logging.getLogger("pcl").warning("--knn-eval / --knn-every have no effect: the kNN monitor needs a labelled "
                                         "test split and %s", why)
    return PretrainData(make(train_set, batch, True), make(eval_set, eval_bs, False), len(base_train), knn)
