"""The built-in demo set: scikit-learn's bundled handwritten digits rendered onto colour clutter."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_digits_demo(renders_train: int = 4, renders_test: int = 2, size: int = 32, seed: int = 0,
                     test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """Render the 1797 8x8 digits of ``sklearn.datasets.load_digits`` at random scale, position, rotation,
    colours, background texture and noise, so that raw pixels do not separate the classes.

    Train/test are split by source image (no digit appears in both). Returns uint8 images N x 3 x size x
    size and labels for 'train' and 'test', plus 'train_source'/'test_source' ids and '{split}_nuisance':
    N x 9 float, the drawn background RGB, foreground RGB, scale and centre x, y (to measure what features
    or clusters follow besides the digit). Deterministic in seed.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # 1797 x 8 x 8
    labels = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(glyphs), generator=gen)
    n_test = int(round(test_fraction * len(glyphs)))
    out: dict[str, torch.Tensor] = {}
    for split, ids, reps in (("test", order[:n_test], renders_test), ("train", order[n_test:], renders_train)):
        src = ids.repeat_interleave(reps)
        out[split], out[f"{split}_nuisance"] = render_glyphs(glyphs[src], size, gen)
        out[f"{split}_labels"] = labels[src]
        out[f"{split}_source"] = src
    return out


def render_glyphs(glyphs: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw grey glyphs (N x h x w in [0, 1], any h, w) into size x size colour clutter: uint8 images N x 3 x size x
    size and the drawn nuisances N x 9 (background RGB, foreground RGB, scale, centre x, y)."""
    n = glyphs.shape[0]
    u = lambda lo, hi, *shape: torch.empty(*shape).uniform_(lo, hi, generator=gen)  # noqa: E731
    scale = u(0.45, 0.9, n)  # digit side as a fraction of the canvas
    angle = u(-0.3, 0.3, n)
    cx, cy = u(-1, 1, n) * (1 - scale), u(-1, 1, n) * (1 - scale)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, -(cos * cx - sin * cy)], 1),
                         torch.stack([sin, cos, -(sin * cx + cos * cy)], 1)], 1)  # canvas -> glyph coords
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    mask = F.grid_sample(glyphs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fg, bg = u(0, 1, n, 3, 1, 1), u(0, 1, n, 3, 1, 1)
    lum = lambda c: (0.299 * c[:, 0] + 0.587 * c[:, 1] + 0.114 * c[:, 2])[:, None]  # noqa: E731
    weak = (lum(fg) - lum(bg)).abs() < 0.35  # keep the digit visible: push fg away from bg in luminance
    fg = torch.where(weak, torch.where(lum(bg) > 0.5, fg * 0.3, 0.7 + 0.3 * fg), fg)
    mask = ((mask - 0.15) * 2.0).clamp(0, 1)  # crisper strokes than the blurry 8x8 upsampling
    texture = F.interpolate(u(-0.1, 0.1, n, 3, 4, 4), size=(size, size), mode="bilinear", align_corners=False)
    img = bg + texture + (fg - bg) * mask + 0.03 * torch.randn(n, 3, size, size, generator=gen)
    nuisance = torch.cat([bg.flatten(1), fg.flatten(1), scale[:, None], cx[:, None], cy[:, None]], 1)  # N x 9
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), nuisance
