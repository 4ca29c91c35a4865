"""The official PIL pipelines (MoCo v1/v2 pretraining, evaluation center crop, linear-probe training)
and the ImageNet normalisation."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torchvision.transforms as T
from PIL import ImageFilter

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


def eval_transform(size: int = 224) -> Callable:
    """Center crop for the E-step and evaluation: Resize(256) + CenterCrop(224) at the default size."""
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def linear_train_transform(size: int = 224, min_scale: float = 0.08) -> Callable:
    """The official linear-probe training augmentation: RandomResizedCrop + horizontal flip."""
    return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(MEAN, STD)])
