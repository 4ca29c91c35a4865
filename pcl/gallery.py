"""Prototype galleries: which images gather around a prototype, as one image per granularity.

A gallery is a grid: one row per chosen prototype (a few drawn with a fixed seed, plus the largest and the
smallest non-empty cluster), its members nearest to the centroid as columns, and a label strip on the left
with the cluster id, its size and phi. Choosing rows is O(N) (one bincount); ranking a row's members touches
only that cluster's rows of the features, so the cost stays seconds at ImageNet scale (no sort over N).

Pure functions here; the engine logs galleries to TensorBoard at each E-step and
``python -m pcl.evaluation.visualize`` writes them as PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pcl.data import MEAN, STD


@dataclass
class GalleryRow:
    cluster: int  # prototype id
    size: int  # members
    phi: float  # concentration (temperature) of the prototype
    members: list[int]  # dataset indices, nearest to the centroid first
    kind: str  # "random", "largest" or "smallest"


def choose_prototypes(sizes: torch.Tensor, num_random: int, seed: int = 0) -> list[tuple[int, str]]:
    """``num_random`` non-empty prototypes drawn with ``seed`` (the same ones every E-step only if the ids
    persist; k-means relabels, so they are a fresh sample), then the largest and the smallest non-empty one.
    sizes: k member counts. Returns [(prototype id, kind)] without repeats."""
    sizes = sizes.cpu()
    masked = sizes.clone().float()
    masked[sizes == 0] = float("inf")
    largest = int(sizes.argmax())
    if int((sizes > 0).sum()) > 1:
        masked[largest] = float("inf")  # ties: the smallest is another cluster
    smallest = int(masked.argmin())
    rest = ((sizes > 0) & (torch.arange(sizes.numel()) != largest) & (torch.arange(sizes.numel()) != smallest))
    rest = rest.nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    drawn = rest[torch.randperm(rest.numel(), generator=gen)[:num_random]].sort().values.tolist()
    rows = [(c, "random") for c in drawn] + [(largest, "largest")]
    return rows + ([(smallest, "smallest")] if smallest != largest else [])


@torch.no_grad()
def nearest_members(features: torch.Tensor, im2cluster: torch.Tensor, centroid: torch.Tensor, cluster: int,
                    count: int) -> list[int]:
    """Indices of the ``count`` members of ``cluster`` nearest (L2) to ``centroid``, nearest first.
    features: N x d, im2cluster: N, centroid: d."""
    members = (im2cluster == cluster).nonzero().flatten()
    dist = (features[members].float() - centroid.float().to(features.device)).pow(2).sum(dim=1)
    order = dist.topk(min(count, members.numel()), largest=False).indices
    return members[order].tolist()


def gallery_rows(features: torch.Tensor, im2cluster: torch.Tensor, centroids: torch.Tensor,
                 concentration: torch.Tensor, num_random: int = 8, columns: int = 8, seed: int = 0) -> list[GalleryRow]:
    """The rows of one granularity's gallery. features: N x d (the E-step's), im2cluster: N, centroids: k x d,
    concentration: k."""
    sizes = torch.bincount(im2cluster, minlength=centroids.shape[0])
    return [GalleryRow(c, int(sizes[c]), float(concentration[c]),
                       nearest_members(features, im2cluster, centroids[c], c, columns), kind)
            for c, kind in choose_prototypes(sizes, num_random, seed)]


def display_images(loader, indices: list[int], size: int = 64) -> torch.Tensor:
    """uint8 n x 3 x size x size pictures of the given dataset indices, as the evaluation transform shows them
    (center crop), from any of the repo's evaluation loaders: in-memory ones (``.images``) or file ones
    (``.loader.dataset``, normalised tensors)."""
    if not indices:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    idx = torch.as_tensor(indices, dtype=torch.long)
    if hasattr(loader, "images"):
        x = loader.images[idx].float() / 255.0
    else:
        dataset = loader.loader.dataset
        x = torch.stack([dataset[int(i)][0] for i in idx])
        x = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def render_grid(rows: list[torch.Tensor], labels: list[str], columns: int, pad: int = 2,
                label_width: int = 120) -> torch.Tensor:
    """One uint8 3 x H x W image: each row's pictures (uint8 n x 3 x s x s, n <= columns) left to right after a
    label strip. Empty cells stay dark grey."""
    from PIL import Image, ImageDraw

    size = max((r.shape[-1] for r in rows if r.numel()), default=32)
    height = len(rows) * (size + pad) + pad
    width = label_width + columns * (size + pad) + pad
    canvas = torch.full((3, height, width), 40, dtype=torch.uint8)
    for i, pics in enumerate(rows):
        top = pad + i * (size + pad)
        for j, pic in enumerate(pics[:columns]):
            left = label_width + pad + j * (size + pad)
            canvas[:, top:top + size, left:left + size] = pic
    image = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(labels):
        draw.multiline_text((4, pad + i * (size + pad) + 2), text, fill=(235, 235, 235), spacing=1)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def row_label(row: GalleryRow) -> str:
    return f"#{row.cluster} {row.kind}\nn={row.size}\nphi={row.phi:.3f}"


def render_gallery(rows: list[GalleryRow], loader, columns: int = 8, size: int = 64) -> torch.Tensor:
    """The gallery image (uint8 3 x H x W) of ``rows`` with pictures from ``loader``."""
    pictures = [display_images(loader, r.members[:columns], size) for r in rows]
    return render_grid(pictures, [row_label(r) for r in rows], columns)


def caption(k: int, rows: list[GalleryRow]) -> str:
    """Markdown table of a gallery's rows (TensorBoard text next to the image)."""
    lines = [f"k = {k}: rows top to bottom, members nearest to the centroid first", "",
             "| row | prototype | kind | size | phi |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {r.cluster} | {r.kind} | {r.size} | {r.phi:.4f} |" for i, r in enumerate(rows)]
    return "\n".join(lines)
