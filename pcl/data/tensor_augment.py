"""MoCo v1/v2 augmentation as batched tensor ops on uint8 images, each op the official one: the crop is torchvision's
RandomResizedCrop + RandomHorizontalFlip with PIL's bilinear resampling (bit-exact for the same box), the colour ops
are torchvision's ColorJitter / RandomGrayscale on tensors, the blur is PIL's ``ImageFilter.GaussianBlur`` (bit-exact
on uint8). One implementation for the in-memory sets (whole images: the crop runs here) and for ``--augment device``
(the loader workers crop, the rest runs on the training device)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from pcl.data.transforms import MEAN, STD

JITTER_V2 = (0.4, 0.4, 0.4, 0.1)  # MoCo v2: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)
JITTER_V1 = (0.4, 0.4, 0.4, 0.4)  # MoCo v1: ColorJitter(0.4, 0.4, 0.4, 0.4)
BLUR_SIGMA = (0.1, 2.0)  # MoCo v2's GaussianBlur([0.1, 2.0]), p=0.5
HUE_SPACES = ("hsv", "yiq")  # hsv: torchvision's hue jitter (official); yiq: a luma-keeping turn (--hue-space yiq)


class TensorAugment:
    """The official MoCo v1 (``aug_plus=False``) or v2 augmentation on a batch of uint8 B x 3 x H x W images, every
    random parameter drawn per sample from ``gen`` (on the images' device); returns float, ImageNet-normalised
    B x 3 x size x size.

    ``crop=True`` (the in-memory sets): the images are whole; RandomResizedCrop(size, scale=(min_scale, 1)) and
    RandomHorizontalFlip run here (:func:`random_resized_crop`). ``crop=False`` (``--augment device``): the loader
    workers already cropped and flipped them (``transforms.pretrain_crop_transform``), so they are size x size.
    Then, as the official lists order them: v2: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8),
    RandomGrayscale(0.2), RandomApply(GaussianBlur(sigma ~ U[0.1, 2]), 0.5); v1: RandomGrayscale(0.2),
    ColorJitter(0.4, 0.4, 0.4, 0.4). The flip moves before the colour ops, which changes nothing: every op is
    flip-equivariant. ``color=False``: crop, flip and normalisation only (the linear probe's augmentation).
    ``hue``: "hsv" is torchvision's hue jitter (official); "yiq" (``--hue-space yiq``, not official) turns the
    colours by the same angle about the grey axis in YIQ space, which keeps each pixel's luma (:func:`adjust_hue_yiq`).

    The constants live on the device once (no host-to-device copy per call after the first on a device).
    """

    def __init__(self, size: int, aug_plus: bool, min_scale: float = 0.2, color: bool = True,
                 crop: bool = True, hue: str = "hsv") -> None:
        if hue not in HUE_SPACES:
            raise ValueError(f"hue space {hue!r}: use one of {', '.join(HUE_SPACES)}")
        self.size, self.aug_plus, self.min_scale, self.color, self.crop = size, aug_plus, min_scale, color, crop
        self.hue = hue
        self._constants: dict[torch.device, dict[str, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """mean, std (1 x 3 x 1 x 1), the jitter bounds (2 x 4) and RGB <-> YIQ (3 x 3 each) on ``device``, built on
        first use."""
        if device not in self._constants:
            self._constants[device] = {
                "mean": torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
                "std": torch.tensor(STD, device=device).view(1, 3, 1, 1),
                "jitter": jitter_bounds(JITTER_V2 if self.aug_plus else JITTER_V1, device),
                "yiq": torch.tensor(RGB_TO_YIQ, device=device),
                "rgb": torch.linalg.inv(torch.tensor(RGB_TO_YIQ, dtype=torch.float64)).float().to(device)}
        return self._constants[device]

    def _hue(self, c: dict[str, torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.hue == "yiq":
            return lambda x, factor: adjust_hue_yiq(x, factor, c["yiq"], c["rgb"])
        return adjust_hue

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 3 x H x W -> float, ImageNet-normalised, on the images' device (ToTensor + Normalize)."""
        c = self.constants(images.device)
        return (images.float() / 255.0 - c["mean"]) / c["std"]

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.constants(images.device)
        b = images.shape[0]
        if self.crop:
            boxes = crop_boxes(b, images.shape[-2], images.shape[-1], (self.min_scale, 1.0), gen)
            flip = torch.rand(b, generator=gen, device=images.device) < 0.5
            images = random_resized_crop(images, boxes, self.size, flip)
        x = images.float() / 255.0  # B x 3 x S x S
        if self.color and self.aug_plus:
            apply = torch.rand(b, generator=gen, device=x.device) < 0.8
            x = torch.where(apply.view(b, 1, 1, 1), color_jitter(x, *jitter_params(b, c["jitter"], gen), self._hue(c)),
                            x)
            x = random_grayscale(x, 0.2, gen)
            apply = torch.rand(b, generator=gen, device=x.device) < 0.5
            sigma = torch.empty(b, device=x.device).uniform_(*BLUR_SIGMA, generator=gen)
            x = torch.where(apply.view(b, 1, 1, 1), gaussian_blur(x, sigma, BLUR_SIGMA[1]), x)
        elif self.color:
            x = random_grayscale(x, 0.2, gen)
            x = color_jitter(x, *jitter_params(b, c["jitter"], gen), self._hue(c))
        return (x - c["mean"]) / c["std"]


# --- RandomResizedCrop + flip, batched: torchvision's box distribution, PIL's bilinear resampling -----------------

PIL_PRECISION_BITS = 22  # PIL's fixed-point resampling coefficients for 8-bit images (32 - 8 - 2 bits)


def crop_boxes(b: int, height: int, width: int, scale: tuple[float, float], gen: torch.Generator,
               ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for ``b`` images of ``height`` x ``width``, batched: up to ``tries`` draws of
    area ~ U[scale] x H x W and log aspect ratio ~ U[log ratio] per image, the first whose rounded box fits, with a
    uniform position; none fits: the centre crop at the nearest allowed ratio. Returns long b x 4 (top, left, h, w)
    on ``gen``'s device. The same distribution as torchvision's loop (not the same random stream)."""
    dev = gen.device
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, tries, generator=gen, device=dev,
                                                                           dtype=torch.float64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(b, tries, generator=gen, device=dev, dtype=torch.float64))
    w = torch.round(torch.sqrt(area * aspect)).long()  # Python's round: half to even, as torch.round
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # b x tries
    first = fits.int().argmax(1, keepdim=True)  # the first fitting try (0 when none fits)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    found = fits.any(1)
    in_ratio = width / height  # the fallback: torchvision's centre crop
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(b, 2, generator=gen, device=dev, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor().long(), (height - fh) // 2)
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor().long(), (width - fw) // 2)
    return torch.stack([top, left, h, w], 1)


def pil_bilinear_taps(in_size: int, start: torch.Tensor, length: torch.Tensor, out_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's 8-bit bilinear resampling coefficients (``precompute_coeffs`` + ``normalize_coeffs_8bpc``) of the segment
    [start, start + length) of an ``in_size`` line resized to ``out_size``, as taps: (first input pixel of each
    output pixel's window, long b x out; integer fixed-point weights of the window's pixels, int32 b x out x K, zero
    past the window). PIL's own arithmetic in float64: triangle filter with support scaled by the reduction factor
    (antialiasing), window rounded and clipped to the segment, weights normalised per output pixel (summed in
    PIL's order), rounded to 22 fractional bits. K = 2 ceil(in_size / out_size) + 1 bounds every window."""
    f64 = dict(device=start.device, dtype=torch.float64)
    taps = 2 * math.ceil(max(in_size / out_size, 1.0)) + 1
    length = length.to(torch.float64)[:, None]  # b x 1
    scale = length / out_size
    filterscale = scale.clamp(min=1.0)
    support = filterscale  # bilinear support 1.0, scaled
    center = (torch.arange(out_size, **f64)[None] + 0.5) * scale  # b x out
    xmin = torch.trunc(center - support + 0.5).clamp(min=0)  # C's (int) truncation, as PIL rounds the window
    xmax = torch.minimum(torch.trunc(center + support + 0.5), length)
    inv = 1.0 / filterscale
    weights, total = [], torch.zeros_like(center)
    for t in range(taps):  # tap t: input pixel xmin + t
        w = (1.0 - ((xmin + t - center + 0.5) * inv).abs()).clamp(min=0.0)
        w = torch.where(xmin + t < xmax, w, torch.zeros((), **f64))
        weights.append(w)
        total = total + w  # left to right, as PIL sums them
    total = torch.where(total == 0, torch.ones((), **f64), total)
    fixed = torch.stack([torch.trunc(0.5 + w / total * (1 << PIL_PRECISION_BITS)) for w in weights], 2)
    return xmin.long() + start.long()[:, None], fixed.to(torch.int32)


SPLIT_BITS = 11  # PIL's 22-bit weights split in two 11-bit halves: float32 matmuls that stay exact


def _pil_pass(x: torch.Tensor, first: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One PIL resampling pass along the last dim: float32 B x C x H x W (integers 0..255) with taps
    (:func:`pil_bilinear_taps`: first b x out, weights b x out x K) -> B x C x H x out, rounded and clipped to
    0..255 as PIL's ``clip8``. One batched float32 matmul with the weights' high and low 11 bits side by side: every
    product and partial sum is an integer below 2^24 (for K <= 31), so float32 holds it exactly; the halves are
    joined in int32."""
    b, c, h, w = x.shape
    out, taps = weights.shape[1], weights.shape[2]
    if taps > 31:
        raise ValueError(f"resampling {w} -> {out} pixels needs {taps} taps per output pixel: at most 31 stay exact")
    index = (first[:, :, None] + torch.arange(taps, device=x.device)).clamp(max=w - 1)  # b x out x K
    halves = torch.cat([weights >> SPLIT_BITS, weights & ((1 << SPLIT_BITS) - 1)], 1).to(x.dtype)  # b x 2out x K
    dense = torch.zeros(b, 2 * out, w, dtype=x.dtype, device=x.device)
    dense.scatter_add_(2, index.repeat(1, 2, 1), halves)  # b x 2out x W (taps past the window weigh 0)
    acc = torch.bmm(x.reshape(b, c * h, w), dense.transpose(1, 2)).to(torch.int32)  # b x CH x 2out, exact
    joined = (acc[..., :out] << SPLIT_BITS) + acc[..., out:] + (1 << (PIL_PRECISION_BITS - 1))
    return (joined >> PIL_PRECISION_BITS).clamp(0, 255).to(x.dtype).view(b, c, h, out)


def random_resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """uint8 B x C x H x W, boxes B x 4 (top, left, h, w) from :func:`crop_boxes`, flip B bool -> uint8 B x C x size
    x size: each box resized as ``TF.resized_crop`` does on a PIL image, mirrored where ``flip``. PIL's bilinear
    resampling in two passes, each rounded to 8 bits, in Pillow 13's order: the rows first unless the height shrinks
    by more than twice what the width does (then the columns first). Bit-exact with Pillow 13."""
    _, _, height, width = images.shape
    cols = pil_bilinear_taps(width, boxes[:, 1], boxes[:, 3], size)  # b x size, b x size x K
    rows = pil_bilinear_taps(height, boxes[:, 0], boxes[:, 2], size)
    cols = tuple(torch.where(flip.view(-1, *[1] * (t.dim() - 1)), t.flip(1), t) for t in cols)  # mirrored rows
    x = images.to(torch.float32)
    out = _pil_pass(_pil_pass(x, *cols).transpose(2, 3).contiguous(), *rows).transpose(2, 3)  # rows first
    if height > size:  # a box can shrink in height only when the image is taller than the output
        shrink_h, shrink_w = boxes[:, 2] - size, boxes[:, 3] - size
        columns_first = ((shrink_h > 0) & (shrink_h > 2 * shrink_w)).view(-1, 1, 1, 1)
        other = _pil_pass(_pil_pass(x.transpose(2, 3).contiguous(), *rows).transpose(2, 3).contiguous(), *cols)
        out = torch.where(columns_first, other, out)
    return out.to(torch.uint8)


# --- the blur: PIL's ImageFilter.GaussianBlur, batched ------------------------------------------------------------


def pil_box_radius(sigma: torch.Tensor, passes: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PIL's extended box filter for ``GaussianBlur(radius=sigma)`` (``_gaussian_blur_radius``, Gwosdek et al. 2011)
    and its fixed-point weights (``ImagingHorizontalBoxBlur``), computed in float32 as PIL does: returns (integer
    radius l, weight of the 2l + 1 inner taps, weight of the two outer taps), each long B, in units of 2^-24."""
    s = sigma.to(torch.float32)
    sigma2 = s * s / passes
    length = torch.sqrt(12.0 * sigma2.double() + 1.0).float()  # [7] box length: C's double sqrt, stored as float
    l = torch.floor((length.double() - 1.0) / 2.0).float()  # [11] integer part of the radius  # noqa: E741
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))  # [14] fractional part
    radius = l + a  # float32
    inner = (float(1 << 24) / (radius * 2 + 1)).to(torch.int64)  # (UINT32)(1 << 24) / (r * 2 + 1), in float32
    outer = ((1 << 24) - (radius.to(torch.int64) * 2 + 1) * inner) // 2
    return radius.to(torch.int64), inner, outer


def max_box_radius(max_sigma: float, passes: int = 3) -> int:
    """The largest integer box radius of :func:`pil_box_radius` for sigma <= ``max_sigma`` (no device sync)."""
    return int(math.floor((math.sqrt(12.0 * max_sigma * max_sigma / passes + 1.0) - 1.0) / 2.0))


def _box_pass(x: torch.Tensor, weights: torch.Tensor, pad: int) -> torch.Tensor:
    """One pass of PIL's extended box blur along the last dim of float64 B x C x H x W (integer values 0..255):
    out[x] = (sum_t weights[t] * in[x + t - pad] + 2^23) >> 24, edges extended (``weights``: B x (2 pad + 1), the
    per-sample taps of :func:`_box_taps`). Exact in float64 (every sum is an integer below 2^35)."""
    w = x.shape[-1]
    padded = x.index_select(3, torch.arange(-pad, w + pad, device=x.device).clamp(0, w - 1))  # edge extension
    acc = torch.full_like(x, float(1 << 23))
    for t in range(2 * pad + 1):
        acc += padded[..., t:t + w] * weights[:, t].view(-1, 1, 1, 1)
    return torch.floor(acc / (1 << 24))


def _box_taps(radius: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor, pad: int) -> torch.Tensor:
    """The extended box as taps -pad..pad (float64 B x (2 pad + 1)): ``inner`` within the integer radius, ``outer``
    at radius + 1, zero beyond."""
    offset = torch.arange(-pad, pad + 1, device=radius.device).abs()[None]  # 1 x T
    r = radius[:, None]
    return torch.where(offset <= r, inner[:, None], torch.where(offset == r + 1, outer[:, None], 0)).to(torch.float64)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float = BLUR_SIGMA[1],
                  passes: int = 3) -> torch.Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` per sample on float B x C x H x W in [0, 1]: the image
    rounded to 8 bits (as PIL holds it), three extended box passes along the rows then three along the columns,
    each rounded to 8 bits, edges extended. Equal to PIL on uint8 images. ``sigma`` (B) is clipped to
    ``max_sigma``, which sets the number of taps (no device sync)."""
    radius, inner, outer = pil_box_radius(sigma.clamp(max=max_sigma), passes)
    pad = max_box_radius(max_sigma, passes) + 2  # + 1 for the outer tap, + 1 against float rounding of the radius
    taps = _box_taps(radius, inner, outer, pad)
    y = torch.round(x.to(torch.float64) * 255.0)
    for _ in range(passes):
        y = _box_pass(y, taps, pad)
    y = y.transpose(2, 3)
    for _ in range(passes):
        y = _box_pass(y, taps, pad)
    return (y.transpose(2, 3) / 255.0).to(x.dtype)


# --- torchvision's colour ops, batched ----------------------------------------------------------------------------
# Each is torchvision.transforms.functional's tensor op on float B x 3 x H x W in [0, 1] with per-sample parameters (B
# tensors). On uint8 torchvision truncates after every op; these stay in float (so they agree with it within 1/255
# per op, and with torchvision on float tensors to float rounding).

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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
    """torchvision's adjust_hue on float: RGB -> HSV, hue + factor mod 1, HSV -> RGB, in closed form (torchvision's
    formulas with v * s = max - min folded in; equal to it to float rounding)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]  # each B x 1 x H x W
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    cr = maxc - minc
    div = torch.where(cr == 0, torch.ones_like(cr), cr)
    h = torch.where(maxc == r, (g - b) / div, torch.where(maxc == g, 2.0 + (b - r) / div, 4.0 + (r - g) / div))
    h = torch.fmod(h / 6.0 + 1.0, 1.0) + factor.view(-1, 1, 1, 1)  # in [-0.5, 1.5)
    h = torch.where(h < 0, h + 1.0, torch.where(h >= 1.0, h - 1.0, h)) * 6.0  # (h + factor) mod 1, times 6
    k = torch.cat([h + n for n in (5.0, 3.0, 1.0)], 1)  # B x 3 x H x W, in [1, 11)
    k = torch.where(k >= 6.0, k - 6.0, k)  # mod 6 (exact: Sterbenz)
    return maxc - cr * torch.minimum(k, 4.0 - k).clamp(0, 1)


RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))  # rows: Y (luma), I, Q


def adjust_hue_yiq(x: torch.Tensor, factor: torch.Tensor, yiq: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Hue jitter that keeps luma (``--hue-space yiq``, not official): each sample's colours turned by factor x 2 pi
    about the grey axis, as a rotation of the (I, Q) chroma plane of YIQ, then clipped to [0, 1]. Y is unchanged
    up to the clip, so a pattern's light/dark contrast survives the jitter; HSV's hue shift (:func:`adjust_hue`)
    changes luma (a yellow made blue turns dark). x: B x 3 x H x W in [0, 1]; factor: B; yiq, rgb: 3 x 3
    (:data:`RGB_TO_YIQ` and its inverse)."""
    angle = factor * (2 * math.pi)
    cos, sin = angle.cos().view(-1, 1, 1, 1), angle.sin().view(-1, 1, 1, 1)  # B x 1 x 1 x 1
    t = torch.einsum("ij,bjhw->bihw", yiq, x)  # B x 3 x H x W: Y, I, Q
    turned = torch.cat([t[:, :1], cos * t[:, 1:2] - sin * t[:, 2:3], sin * t[:, 1:2] + cos * t[:, 2:3]], 1)
    return torch.einsum("ij,bjhw->bihw", rgb, turned).clamp(0, 1)


def jitter_bounds(strength: tuple[float, float, float, float], device: torch.device | str) -> torch.Tensor:
    """``ColorJitter(*strength)``'s factor ranges as 2 x 4 (low, high) on ``device``: brightness, contrast, saturation
    in [max(0, 1 - s), 1 + s], hue in [-s, s]."""
    lo = [max(0.0, 1 - s) for s in strength[:3]] + [-strength[3]]
    hi = [1 + s for s in strength[:3]] + [strength[3]]
    return torch.tensor([lo, hi], device=device)


def jitter_params(b: int, bounds: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ColorJitter parameters as ``ColorJitter.get_params`` draws them: an order of the four ops (a
    uniform random permutation, like its ``torch.randperm(4)``; 0 brightness, 1 contrast, 2 saturation, 3 hue)
    and the factors, uniform in ``bounds`` (:func:`jitter_bounds`, on ``gen``'s device).
    Returns (order B x 4 long, factors B x 4) on ``gen``'s device."""
    dev = gen.device
    order = torch.rand(b, 4, generator=gen, device=dev).argsort(dim=1)
    factors = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(b, 4, generator=gen, device=dev)
    return order, factors


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor,
                 hue: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """ColorJitter with per-sample order and factors (:func:`jitter_params`), without data-dependent shapes (no
    host sync): the blends (brightness, contrast, saturation: each a blend towards a per-sample target) placed
    before each sample's hue step, one hue pass over the batch, then the blends after it. A sample's blend in a
    round that is not its own has factor 1, an exact identity (1 * x + 0 * target). ``hue``: the hue op
    (default :func:`adjust_hue`, torchvision's)."""
    hue_at = (order == 3).int().argmax(dim=1)  # B: the position of hue in each sample's order
    for j in range(3):
        x = _blend_round(x, order[:, j], factors, j < hue_at)
    x = (hue or adjust_hue)(x, factors[:, 3])
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
