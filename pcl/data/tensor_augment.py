"""MoCo v1/v2 augmentation as batched tensor ops on uint8 images, drawn from a torch.Generator
(in-memory sets: on a small CPU budget PIL augmentation costs more than the model)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pcl.data.transforms import MEAN, STD


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
