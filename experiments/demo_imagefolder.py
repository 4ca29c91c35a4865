#!/usr/bin/env python
"""Does the demo preset learn on images it was not tuned on? Build a comparable ImageFolder and train on it.

Writes an ImageFolder of 32 px colour images (default 500 training and 100 validation images per class, 10
classes): Fashion-MNIST items (not digits, not the built-in renders) drawn into the demo's clutter -- random
background and foreground colours, background texture, scale, position, rotation and noise -- then runs
``main_pcl.py -c configs/demo.yaml DIR`` on it (the file/PIL path) and prints kNN top-1 on the validation
folder for the learned backbone, a random init and raw pixels.

    python experiments/demo_imagefolder.py --idx-dir /usr/share/datasets/fashion-mnist --out-dir exp/clutter_fmnist
"""

from __future__ import annotations

import argparse
import os

import torch

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import ROOT, RESULTS, hardware, write_json, use_cores
from pcl.config import build_pretrain_parser, parse_args
from pcl.data import load_mnist_family, render_glyphs
from pcl.engine import fit


def write_folder(idx_dir: str, root: str, per_class: dict[str, int], size: int = 32, seed: int = 1) -> None:
    """Render ``per_class[split]`` items of each class of the idx set into ``root/{split}/{class}/*.png``."""
    from PIL import Image

    sets = load_mnist_family("fashion-mnist", idx_dir)
    gen = torch.Generator().manual_seed(seed)
    for split, source in (("train", "train"), ("val", "test")):
        images, labels = sets[source][:, 0].float() / 255.0, sets[f"{source}_labels"]
        picked = torch.cat([torch.nonzero(labels == c).flatten()[:per_class[split]] for c in range(10)])
        rendered, _ = render_glyphs(images[picked], size, gen)
        for i, (img, label) in enumerate(zip(rendered, labels[picked].tolist())):
            folder = os.path.join(root, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:05d}.png"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out-dir", default="exp/clutter_fmnist")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--json", default=os.path.join(RESULTS, "demo_imagefolder.json"))
    p.add_argument("overrides", nargs="*", help="extra main_pcl flags, after --")
    opts = p.parse_args(argv)
    data = os.path.join(opts.out_dir, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        write_folder(opts.idx_dir, data, {"train": opts.train_per_class, "val": opts.val_per_class})
    args = parse_args(build_pretrain_parser(), ["-c", os.path.join(ROOT, "configs", "demo.yaml"), data, "--exp-dir",
                                                os.path.join(opts.out_dir, "run"), "--no-progress", *opts.overrides])
    stats = fit(args)
    result = {"hardware": hardware(), "data": data, "overrides": opts.overrides, "knn": stats["knn"]}
    write_json(result, opts.json)
    return result


if __name__ == "__main__":
    use_cores()
    main()
