"""Datasets, augmentations and loaders for pretraining and evaluation.

Two input paths, one interface (loaders that yield ``(im_q, im_k, index)`` for training and
``(images, index)`` or ``(images, labels, index)`` for feature passes):
- files (ImageFolder, CIFAR/STL from disk): the official PIL augmentations in DataLoader workers, or with
  ``--augment device`` only the official crop there (uint8) and the colour ops batched on the training device
  (with ``--decode device`` the workers only read the JPEG bytes and draw the crop boxes; the device decodes);
- in-memory uint8 tensors (the built-in demo set, the MNIST family): the same augmentations as batched tensor
  ops drawn from a ``torch.Generator``, because on a small CPU budget PIL augmentation costs more than the model.

Modules: ``registry`` (the dataset table: every --dataset value and its facts), ``transforms`` (PIL pipelines),
``tensor_augment`` (batched), ``demo`` (the digits set), ``datasets``,
``loaders`` (seeded, resumable), ``device_input`` (the side-stream prefetch and ``--decode device``), ``pretrain`` / ``labelled`` (what each side gets), ``transfer`` (VOC07,
Places205). The names below are the package's public ones.
"""

from pcl.data.datasets import (IDX_FILES, IndexedDataset, LabelledDataset, ListedImageFolder, Relabelled, SafeImages,
                               check_expected, data_settings, file_sets, image_folder, load_image, load_in_memory, load_mnist_family,
                               per_class_fraction, printable, read_class_list, read_idx, read_subset, write_idx)
from pcl.data.demo import make_digits_demo, render_glyphs
from pcl.data.labelled import LabelledData, build_labelled_data
from pcl.data.device_input import (EncodedImages, EncodedPairs, SideStreamPrefetch, collate_encoded,
                                    collate_encoded_images, decode_centre_crops, decode_crops)
from pcl.data.loaders import (DeviceAugmentLoader, DeviceEvalLoader, FileLoader, ShardSampler, TensorEvalLoader,
                              TensorLabelledLoader, TensorPairLoader, epoch_seed, stream_seed)
from pcl.data.pretrain import PretrainData, build_pretrain_data
from pcl.data.registry import DATASETS, DatasetSpec
from pcl.data.tensor_augment import TensorAugment
from pcl.data.transfer import PLACES_LAYOUT, VOC_CLASSES, VOC_LAYOUT, VOC07, Places205, one_vs_rest
from pcl.data.transforms import (MEAN, STD, GaussianBlur, PretrainCropBoxes, eval_crop_transform, eval_transform,
                                 linear_train_transform, pretrain_crop_transform, pretrain_transform)

__all__ = ["DATASETS", "DatasetSpec", "IDX_FILES", "IndexedDataset", "LabelledDataset", "ListedImageFolder",
           "Relabelled", "SafeImages", "check_expected", "data_settings", "file_sets", "image_folder", "load_image", "load_in_memory",
           "load_mnist_family", "per_class_fraction", "printable", "read_class_list", "read_idx", "read_subset",
           "write_idx", "make_digits_demo", "render_glyphs", "LabelledData", "build_labelled_data",
           "DeviceAugmentLoader", "DeviceEvalLoader", "EncodedImages", "EncodedPairs", "FileLoader", "ShardSampler",
           "SideStreamPrefetch", "TensorEvalLoader", "TensorLabelledLoader", "TensorPairLoader", "collate_encoded",
           "collate_encoded_images", "decode_centre_crops", "decode_crops",
           "epoch_seed", "stream_seed", "PretrainData", "build_pretrain_data", "TensorAugment", "PLACES_LAYOUT",
           "VOC_CLASSES", "VOC_LAYOUT", "VOC07", "Places205", "one_vs_rest", "MEAN", "STD", "GaussianBlur",
           "PretrainCropBoxes", "eval_crop_transform", "eval_transform", "linear_train_transform",
           "pretrain_crop_transform", "pretrain_transform"]
