"""MoCo v1/v2 augmentation as batched tensor ops on uint8 images, drawn from a torch.Generator: for in-memory
sets (mode "tensor": on a small CPU budget PIL augmentation costs more than the model), and for file datasets
whose loader workers only crop (mode "torchvision": torchvision's colour ops, on the training device)."""

from __future__ import annotations

import math
from typing import Literal

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

    ``mode="torchvision"``: the images come already cropped and flipped (uint8 B x 3 x size x size, by the
    official RandomResizedCrop + RandomHorizontalFlip in the loader workers, see
    ``transforms.pretrain_crop_transform``) and on ``gen``'s device; what is left of the official list runs here
    batched, each op as torchvision computes it on tensors: ColorJitter (v2: 0.4, 0.4, 0.4, 0.1 with p=0.8; v1:
    0.4 x 4, after RandomGrayscale) with its per-sample random order of the four ops, hue through HSV; RandomGrayscale
    (0.2); v2's Gaussian blur (p=0.5, sigma ~ U[0.1, 2], not scaled by size, as official); then normalisation.
    Flipping before the colour ops instead of after them changes nothing (every op is flip-equivariant).
    ``color=False`` there: normalisation only. The default mode's numerics are unchanged by this mode.
    """

    def __init__(self, size: int, aug_plus: bool, min_scale: float = 0.2, color: bool = True,
                 mode: Literal["tensor", "torchvision"] = "tensor") -> None:
        if mode not in ("tensor", "torchvision"):
            raise ValueError(f"TensorAugment mode {mode!r}: expected 'tensor' or 'torchvision'")
        self.size, self.aug_plus, self.min_scale, self.color, self.mode = size, aug_plus, min_scale, color, mode
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.mode == "torchvision":
            return self._torchvision(images, gen)
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

    # --- mode "torchvision": the official list's colour ops on crops made by the loader workers ---------------

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 3 x H x W -> float, ImageNet-normalised, on the images' device (ToTensor + Normalize)."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() / 255.0 - mean) / std

    def _torchvision(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = images.float() / 255.0  # B x 3 x S x S on gen.device
        b = x.shape[0]
        if self.color and self.aug_plus:  # crop, RandomApply(jitter, 0.8), RandomGrayscale(0.2), RandomApply(blur, 0.5)
            apply = torch.rand(b, generator=gen, device=x.device) < 0.8
            x = torch.where(apply.view(b, 1, 1, 1), color_jitter(x, *jitter_params(b, (0.4, 0.4, 0.4, 0.1), gen)), x)
            x = random_grayscale(x, 0.2, gen)
            apply = torch.rand(b, generator=gen, device=x.device) < 0.5
            sigma = torch.empty(b, device=x.device).uniform_(0.1, 2.0, generator=gen)
            x = torch.where(apply.view(b, 1, 1, 1), gaussian_blur(x, sigma, BLUR_KERNEL), x)
        elif self.color:  # v1: crop, RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4)
            x = random_grayscale(x, 0.2, gen)
            x = color_jitter(x, *jitter_params(b, (0.4, 0.4, 0.4, 0.4), gen))
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std


# torchvision-faithful colour ops on float B x 3 x H x W in [0, 1] with per-sample parameters (B tensors). Each is
# torchvision.transforms.functional's tensor op, batched; on uint8 torchvision truncates after every op, these stay
# in float (so they agree with it within 1/255 per op).

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (not the 0.299 of the "tensor" mode)
BLUR_KERNEL = 2 * math.ceil(3 * 2.0) + 1  # 13: the Gaussian to 3 sigma at the largest sigma (2.0) of MoCo v2's blur


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> B x 1 x H x W luma, torchvision's weights."""
    return GRAY[0] * x[:, 0:1] + GRAY[1] * x[:, 1:2] + GRAY[2] * x[:, 2:3]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV (torchvision's formulas), hue + factor mod 1, HSV -> RGB (the closed form of torchvision's
    six-sector table: the same values, without its 18 stacked planes)."""
    maxc, minc = x.max(dim=1, keepdim=True).values, x.min(dim=1, keepdim=True).values  # B x 1 x H x W
    eqc, cr = maxc == minc, maxc - minc
    s = cr / torch.where(eqc, torch.ones_like(maxc), maxc)
    div = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = ((maxc - x) / div).unbind(1)  # each B x H x W
    r, g = x[:, 0], x[:, 1]
    m = maxc[:, 0]
    h = ((m == r) * (bc - gc) + ((m == g) & (m != r)) * (2.0 + rc - bc) + ((m != g) & (m != r)) * (4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = ((h + factor.view(-1, 1, 1)) % 1.0)[:, None]  # B x 1 x H x W
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + h * 6.0) % 6.0  # B x 3 x H x W
    return (maxc - maxc * s * torch.minimum(k, 4.0 - k).clamp(0, 1)).clamp(0, 1)


def jitter_params(b: int, strength: tuple[float, float, float, float],
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ColorJitter parameters as ``ColorJitter.get_params`` draws them: an order of the four ops (a
    uniform random permutation, like its ``torch.randperm(4)``; 0 brightness, 1 contrast, 2 saturation, 3 hue)
    and the factors, brightness/contrast/saturation ~ U[max(0, 1 - s), 1 + s], hue ~ U[-s, s].
    Returns (order B x 4 long, factors B x 4) on ``gen``'s device."""
    dev = gen.device
    order = torch.rand(b, 4, generator=gen, device=dev).argsort(dim=1)
    lo = torch.tensor([max(0.0, 1 - s) for s in strength[:3]] + [-strength[3]], device=dev)
    hi = torch.tensor([1 + s for s in strength[:3]] + [strength[3]], device=dev)
    factors = lo + (hi - lo) * torch.rand(b, 4, generator=gen, device=dev)
    return order, factors


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample order and factors (:func:`jitter_params`), without data-dependent shapes (no
    host sync): the blends (brightness, contrast, saturation: each a blend towards a per-sample target) placed
    before each sample's hue step, one hue pass over the batch, then the blends after it. A sample's blend in a
    round that is not its own has factor 1, an exact identity (1 * x + 0 * target)."""
    hue_at = (order == 3).int().argmax(dim=1)  # B: the position of hue in each sample's order
    for j in range(3):
        x = _blend_round(x, order[:, j], factors, j < hue_at)
    x = adjust_hue(x, factors[:, 3])
    for j in range(1, 4):
        x = _blend_round(x, order[:, j], factors, j > hue_at)
    return x


def _blend_round(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One position of the jitter order for the ``active`` samples (op 0 brightness, 1 contrast, 2 saturation)."""
    b = x.shape[0]
    sel = op.view(b, 1, 1, 1)
    gray = rgb_to_grayscale(x)  # B x 1 x H x W
    target = torch.where(sel == 0, torch.zeros_like(gray),
                         torch.where(sel == 1, gray.mean(dim=(1, 2, 3), keepdim=True), gray))
    factor = torch.where(active, factors.gather(1, op.clamp(max=2)[:, None])[:, 0], torch.ones_like(factors[:, 0]))
    return _blend(x, target, factor)


def random_grayscale(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """RandomGrayscale(p): each sample with probability p to its 3-channel luma."""
    pick = (torch.rand(x.shape[0], generator=gen, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(pick, rgb_to_grayscale(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """torchvision's gaussian_blur(kernel_size, sigma) per sample: the kernel exp(-t^2 / 2 sigma^2) on
    t = -k//2 .. k//2, normalised, reflect padding; separable (two 1-D passes). A kernel wider than the image is
    cut to what reflect padding allows."""
    b, c, hgt, wid = x.shape
    half = min(kernel_size // 2, hgt - 1, wid - 1)
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (C*B) x K
    y = F.pad(x.reshape(1, c * b, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=c * b)
    return F.conv2d(y, kernel[:, None, :, None], groups=c * b).reshape_as(x)
