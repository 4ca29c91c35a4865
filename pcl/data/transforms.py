"""The official PIL pipelines (MoCo v1/v2 pretraining, evaluation center crop, linear-probe training), their
geometric part alone as uint8 tensors (``--augment device``: colour and normalisation on the training device),
the random draws of that geometric part alone (``--decode device``: the image is decoded and cropped on the device),
and the ImageNet normalisation."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


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


def pretrain_crop_transform(size: int = 224, min_scale: float = 0.2) -> Callable:
    """The geometric part of :func:`pretrain_transform` (v1 and v2 alike): the official RandomResizedCrop and
    RandomHorizontalFlip, same ops and parameters, then the crop as uint8 3 x size x size (PILToTensor: no float
    conversion, no normalisation; 4x less to pin and copy). The colour ops follow on the device
    (``TensorAugment(mode="torchvision")``)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])


class PretrainCropBoxes:
    """The random draws of :func:`pretrain_crop_transform` without the image (``--decode device``): the official
    RandomResizedCrop box from the image size alone, then the official flip, the same ops (same scale, ratio and
    flip probability) drawing from torch's RNG in the same order, so for the same RNG state the box and flip are
    the ones the PIL pipeline would take. ``apply`` takes such a draw on a decoded PIL image (the workers' path
    for files the device cannot decode), giving exactly what ``pretrain_crop_transform`` gives."""

    def __init__(self, size: int = 224, min_scale: float = 0.2) -> None:
        self.crop, self.flip = pretrain_crop_transform(size, min_scale).transforms[:2]

    def __call__(self, width: int, height: int) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of one view of a ``width`` x ``height`` image."""
        stand_in = torch.empty(()).expand(1, height, width)  # 1 x H x W, no memory: get_params reads the size only
        i, j, h, w = T.RandomResizedCrop.get_params(stand_in, self.crop.scale, self.crop.ratio)
        return i, j, h, w, bool(torch.rand(1) < self.flip.p)

    def apply(self, img: Image.Image, box: Sequence[int]) -> torch.Tensor:
        """A drawn (top, left, height, width, flip) on ``img``, as the official ops apply it: uint8 3 x S x S."""
        i, j, h, w, flip = (int(v) for v in box)
        out = TF.resized_crop(img, i, j, h, w, self.crop.size, self.crop.interpolation, antialias=self.crop.antialias)
        return TF.pil_to_tensor(TF.hflip(out) if flip else out)


def eval_crop_transform(size: int = 224) -> Callable:
    """:func:`eval_transform` without ToTensor + Normalize: Resize(256) + CenterCrop(224) at the default size,
    as uint8 3 x size x size (normalised on the device)."""
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.PILToTensor()])


def eval_transform(size: int = 224) -> Callable:
    """Center crop for the E-step and evaluation: Resize(256) + CenterCrop(224) at the default size."""
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def linear_train_transform(size: int = 224, min_scale: float = 0.08) -> Callable:
    """The official linear-probe training augmentation: RandomResizedCrop + horizontal flip."""
    return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(MEAN, STD)])
