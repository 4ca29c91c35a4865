#!/usr/bin/env python
"""Does a small preset learn on images it was not tuned on? Build a comparable ImageFolder and train on it.

Writes an ImageFolder of 32 px colour images, 10 classes, from one of two sources, then runs
``main_pcl.py -c CONFIG DIR`` on it (the file/PIL path) and prints kNN top-1 on the validation folder for the
learned backbone, a random init and raw pixels:

- ``--source fashion`` (default 500 training and 100 validation images per class): Fashion-MNIST items (not
  digits) drawn into the built-in demo's clutter -- random background and foreground colours, background
  texture, scale, position, rotation and noise;
- ``--source digits`` (default 4,000 training and 1,000 validation images): the 1,797 real handwritten 8x8
  digits of scikit-learn written on paper by a renderer of this script's own, unlike the demo's: elastic
  distortion, shear, stroke width, dark ink on light tinted paper with a lighting gradient, faint ruled lines and
  stray pen strokes, sensor noise -- mild clutter, little colour. Train and validation images come from disjoint
  source digits.

The folder is written once into OUT_DIR/data (into a temporary folder, then renamed) with ``made_with.json``, the
flags that drew it (and the Fashion-MNIST files' fingerprint); a later call reuses it only when it would draw the same
folder, and refuses it in one line otherwise, as it refuses a run folder that holds a run (pass ``-- --resume auto``
to continue it). The JSON goes to ``exp/results/demo_imagefolder[_digits].json`` unless ``--json`` names a path.

    python experiments/demo_imagefolder.py --idx-dir /usr/share/datasets/fashion-mnist --out-dir exp/clutter_fmnist
    python experiments/demo_imagefolder.py --source digits --out-dir exp/paper_digits
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import shutil

import torch
import torch.nn.functional as F

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import (ROOT, check_made_with, cli, default_out, fingerprint, hardware, log_epochs, made_with,
                   write_json)
from pcl import PCLError
from pcl.config import build_pretrain_parser, parse_args
from pcl.data import load_mnist_family, render_glyphs
from pcl.engine import fit


def save_folder(root: str, split: str, images: torch.Tensor, labels: list[int]) -> None:
    """``images`` (N x 3 x H x W uint8) as ``root/split/class_{label}/{i}.png``."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, split, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:05d}.png"))


def write_fashion(idx_dir: str, root: str, per_class: dict[str, int], size: int = 32, seed: int = 1) -> None:
    """Render ``per_class[split]`` items of each Fashion-MNIST class into the demo's clutter."""
    sets = load_mnist_family("fashion-mnist", idx_dir)
    gen = torch.Generator().manual_seed(seed)
    for split, source in (("train", "train"), ("val", "test")):
        images, labels = sets[source][:, 0].float() / 255.0, sets[f"{source}_labels"]
        picked = torch.cat([torch.nonzero(labels == c).flatten()[:per_class[split]] for c in range(10)])
        rendered, _ = render_glyphs(images[picked], size, gen)
        save_folder(root, split, rendered, labels[picked].tolist())


def render_on_paper(glyphs: torch.Tensor, size: int, gen: torch.Generator, clutter: bool = True,
                    anywhere: bool = False, nuisances: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Write grey glyphs (N x h x w in [0, 1]) as ink on paper: N x 3 x size x size uint8.

    Per image: scale 0.55-0.85 of the canvas, rotation +-12 deg, shear +-0.25, a smooth elastic displacement,
    stroke width from a random threshold of the upsampled glyph, dark ink (black, blue or grey) on light paper
    with a slight tint and a lighting gradient, 0-2 faint ruled lines, 0-2 stray strokes, noise. ``clutter=False``:
    the same digits, ink, tint and noise on flat paper (no gradient, lines or strokes; the random draws are the same).
    ``anywhere``: as a digit written anywhere on a note, scale 0.4-0.7 and the centre anywhere the digit fits,
    instead of near the centre (within 60 % of the free margin). ``nuisances`` (a dict, filled in when given): per
    image the draws that say nothing about the digit -- ``ink`` (0 black, 1 blue, 2 grey), ``ruled`` and ``stray``
    (1 where drawn), ``paper`` (brightness), ``x`` and ``y`` (the digit's centre, -1..1)."""
    n = glyphs.shape[0]
    u = lambda lo, hi, *shape: torch.empty(*shape).uniform_(lo, hi, generator=gen)  # noqa: E731
    scale = u(0.4, 0.7, n) if anywhere else u(0.55, 0.85, n)
    angle, shear = u(-0.21, 0.21, n), u(-0.25, 0.25, n)
    reach = 1.0 if anywhere else 0.6
    cx, cy = u(-reach, reach, n) * (1 - scale), u(-reach, reach, n) * (1 - scale)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear / scale, -(cos * cx - sin * cy)], 1),
                         torch.stack([sin, cos, -(sin * cx + cos * cy)], 1)], 1)  # canvas -> glyph coords
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    warp = F.interpolate(u(-1, 1, n, 2, 5, 5), size=(size, size), mode="bicubic", align_corners=False)
    grid = grid + 0.12 * warp.permute(0, 2, 3, 1)  # elastic: ~2 px at 32 px
    glyph = F.interpolate(glyphs[:, None], scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    ink = F.grid_sample(glyph, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cut = u(0.2, 0.55, n, 1, 1, 1)  # low cut: thick strokes, high cut: thin ones
    ink = ((ink - cut) / 0.2).clamp(0, 1)

    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    # faint ruled lines: horizontal, random phase and spacing, 0-2 of them visible per image
    spacing, phase = u(0.6, 1.2, n, 1, 1), u(0, 1, n, 1, 1)
    ruled = (torch.cos(2 * math.pi * (ys / spacing + phase)) > 0.97).float() * (u(0, 1, n, 1, 1) < 0.6)
    # stray strokes: a short line segment at a random place and angle in half of the images
    a, px, py = u(0, math.pi, n, 1, 1), u(-1, 1, n, 1, 1), u(-1, 1, n, 1, 1)
    along = (xs - px) * torch.cos(a) + (ys - py) * torch.sin(a)
    across = -(xs - px) * torch.sin(a) + (ys - py) * torch.cos(a)
    stray = ((across.abs() < 0.04) & (along.abs() < u(0.2, 0.6, n, 1, 1))).float() * (u(0, 1, n, 1, 1) < 0.5)

    paper = u(0.78, 0.97, n, 1, 1, 1) + u(-0.04, 0.04, n, 3, 1, 1)  # light, slightly tinted
    light = 1 + u(-0.12, 0.12, n, 1, 1, 1) * xs + u(-0.12, 0.12, n, 1, 1, 1) * ys  # lighting gradient
    kind = torch.randint(0, 3, (n,), generator=gen)
    inks = torch.tensor([[0.08, 0.08, 0.1], [0.1, 0.15, 0.45], [0.3, 0.3, 0.3]])[kind] + u(0, 0.08, n, 3)
    inkc = inks[:, :, None, None]
    if not clutter:
        light, ruled, stray = torch.ones_like(light), torch.zeros_like(ruled), torch.zeros_like(stray)
    img = paper * light
    img = img + (0.55 - img) * 0.35 * ruled[:, None]  # grey-blue rule at a third of full contrast
    img = img + (inkc - img) * (0.6 * stray[:, None])
    img = img + (inkc - img) * ink
    img = img + 0.025 * torch.randn(n, 3, size, size, generator=gen)
    if nuisances is not None:
        nuisances.update(ink=kind, ruled=(ruled.flatten(1).amax(1) > 0).long(), stray=(stray.flatten(1).amax(1) > 0).long(),
                         paper=paper.mean((1, 2, 3)), x=-cx, y=-cy)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def write_digits(root: str | None, counts: dict[str, int], size: int = 32, seed: int = 1, clutter: bool = True,
                 anywhere: bool = False, images_out: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """Render scikit-learn's handwritten digits on paper: ``counts[split]`` images per split, the validation
    images from a fifth of the source digits that the training images never use. Returns per split the labels
    (``digit``) and the nuisances of :func:`render_on_paper`, image i being ``{i:05d}.png``; ``root`` None: the
    same draws, nothing written. ``images_out`` (filled in when given): per split the uint8 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(glyphs), generator=gen)
    n_val = len(glyphs) // 5
    splits = (("val", order[:n_val]), ("train", order[n_val:]))
    for split, ids in splits:  # before any drawing: a class without an image breaks the folder's layout
        first = [int(torch.nonzero(labels[ids] == c)[0]) for c in range(10)]
        if counts[split] <= max(first):
            missing = [c for c in range(10) if first[c] >= counts[split]]
            raise PCLError(f"--{split}-images {counts[split]}: the first {counts[split]} digits drawn for {split}/ "
                           f"hold no {', '.join(map(str, missing))}, and every class needs an image: give "
                           f"--{split}-images {max(first) + 1} or more")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for split, ids in splits:
        src = ids[torch.arange(counts[split]) % len(ids)]
        out[split] = {"digit": labels[src]}
        images = render_on_paper(glyphs[src], size, gen, clutter, anywhere, nuisances=out[split])
        if images_out is not None:
            images_out[split] = images
        if root is not None:
            save_folder(root, split, images, labels[src].tolist())
    return out


def run_summary(exp_dir: str) -> dict:
    """What the run's ``log.txt`` says about its course: epochs, last InfoNCE loss, training seconds and the NMI (%)
    of the coarsest granularity's clusters with the labels at the first and last E-step. The log is appended to,
    so only the lines from the last start at epoch 0 count, and of an epoch repeated after a resume the last line;
    {} (the kNN result is kept) when the log is missing or unreadable."""
    try:
        epochs = list(log_epochs(exp_dir).values())
    except (OSError, ValueError):
        return {}
    if not epochs:
        return {}
    ks = sorted(int(k[5:]) for k in epochs[-1] if k.startswith("nmi_k"))
    nmi = [e[f"nmi_k{ks[0]}"] for e in epochs if ks and f"nmi_k{ks[0]}" in e]
    return {"epochs": len(epochs), "loss_inst_last": round(epochs[-1]["loss_inst"], 3),
            "train_seconds": round(sum(e["seconds"] for e in epochs), 1),  # an epoch's seconds include its E-step
            "nmi_with_labels": {"k": ks[0], "first_estep": round(nmi[0], 2), "last_estep": round(nmi[-1], 2)}
            if nmi else None}


def folder_record(opts: argparse.Namespace) -> dict:
    """What draws the folder: the source and its flags (and, for Fashion-MNIST, the fingerprint of its idx files)."""
    if opts.source == "fashion":
        return {"source": "fashion", "train_per_class": opts.train_per_class, "val_per_class": opts.val_per_class,
                "idx_fingerprint": fingerprint(load_mnist_family("fashion-mnist", opts.idx_dir))}
    return {"source": "digits", "train_images": opts.train_images, "val_images": opts.val_images,
            "clutter": not opts.no_clutter, "anywhere": opts.anywhere}


def build_folder(opts: argparse.Namespace, data: str) -> None:
    """OUT_DIR/data: reused when its made_with.json says it was drawn with these flags, refused when it was drawn
    otherwise or has no record (a half-written folder of an older script); else drawn into a temporary folder that
    is renamed into place once complete."""
    record = folder_record(opts)
    if check_made_with(data, record, "an image folder", "delete it to draw it again, or give another --out-dir"):
        return
    counts = (opts.train_per_class, opts.val_per_class) if opts.source == "fashion" else (opts.train_images,
                                                                                           opts.val_images)
    if min(counts) < 1:
        raise PCLError(f"--source {opts.source}: {counts} images for train/ and val/: give at least 1 per class")
    tmp = f"{data}.partial{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if opts.source == "fashion":
            write_fashion(opts.idx_dir, tmp, {"train": opts.train_per_class, "val": opts.val_per_class})
        else:
            write_digits(tmp, {"train": opts.train_images, "val": opts.val_images}, clutter=not opts.no_clutter,
                         anywhere=opts.anywhere)
        made_with(tmp, record)
        os.rename(tmp, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed or interrupted draw leaves nothing


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("fashion", "digits"), default="fashion")
    p.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    p.add_argument("--out-dir", default=None, help="default exp/clutter_fmnist or exp/paper_digits")
    p.add_argument("--train-per-class", type=int, default=500, help="--source fashion")
    p.add_argument("--val-per-class", type=int, default=100, help="--source fashion")
    p.add_argument("--train-images", type=int, default=4000, help="--source digits")
    p.add_argument("--val-images", type=int, default=1000, help="--source digits")
    p.add_argument("--no-clutter", action="store_true", help="--source digits: flat paper, no ruled lines or strokes")
    p.add_argument("--anywhere", action="store_true",
                   help="--source digits: smaller digits placed anywhere on the page, not near the centre")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--json", default=None, help="default exp/results/demo_imagefolder[_digits].json")
    p.add_argument("overrides", nargs="*", help="extra main_pcl flags, after --")
    opts = p.parse_args(argv)
    out_dir = opts.out_dir or ("exp/clutter_fmnist" if opts.source == "fashion" else "exp/paper_digits")
    json_path = opts.json or default_out("demo_imagefolder" + ("_digits" if opts.source == "digits" else "") + ".json")
    data = os.path.join(out_dir, "data")
    # a folder takes the PIL path, whose hue is torchvision's: the demo preset's --hue-space yiq would only warn
    args = parse_args(build_pretrain_parser(), ["-c", opts.config, data, "--exp-dir", os.path.join(out_dir, "run"),
                                                "--no-progress", "--hue-space", "hsv", *opts.overrides])
    if glob.glob(os.path.join(glob.escape(args.exp_dir), "checkpoint_*.pth.tar")) and not (args.resume or
                                                                                           args.overwrite):
        raise PCLError(f"{args.exp_dir} holds a run already: give another --out-dir (or -- --exp-dir), or pass "
                       f"-- --resume auto to continue it")
    build_folder(opts, data)
    stats = fit(args)
    if "knn" not in stats:
        raise PCLError(f"{args.exp_dir}: the run reported no kNN result (it had finished already, or -- "
                       f"--no-knn-eval): nothing to write to {json_path}")
    result = {"hardware": hardware(), "source": opts.source, "config": os.path.relpath(opts.config, ROOT),
              "data": data, "overrides": opts.overrides, "knn": stats["knn"], **run_summary(args.exp_dir)}
    write_json(result, json_path)
    return result


if __name__ == "__main__":
    cli(main)
