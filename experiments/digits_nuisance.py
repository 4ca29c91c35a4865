#!/usr/bin/env python
"""What do features learned on the digits on paper encode: the digit, or the page it is drawn on?

Re-draws the nuisances of a ``demo_imagefolder.py --source digits`` folder (the same seeded draws that wrote it:
ink colour, ruled lines, stray strokes, paper brightness, the digit's position; checked against the saved images)
and reports, for each checkpoint, a random init (shaped like the first checkpoint) and raw pixels, the kNN top-1
(k = 20, T = 0.07, the training folder as the bank, the run's centre crop) of every attribute on the validation
folder, next to its majority-class rate. Paper brightness and position are split into terciles of the training
folder. A run that learned the digit predicts ``digit`` best; one that learned the page predicts the nuisances.

    python experiments/digits_nuisance.py exp/any_digits/data --anywhere random exp/any_digits/run_b64/checkpoint_last.pth.tar
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import cli, default_out, hardware, write_json
from demo_imagefolder import write_digits
from feature_rank import load_model
from pcl.checkpoint import load_checkpoint
from pcl.data import eval_transform
from pcl.evaluation.knn import knn_accuracy


def load_split(root: str, split: str, n: int) -> torch.Tensor:
    """Image i of the split (``class_*/{i:05d}.png``) as uint8 N x 3 x H x W, in index order."""
    paths: dict[int, str] = {}
    for folder in os.listdir(os.path.join(root, split)):
        for name in os.listdir(os.path.join(root, split, folder)):
            paths[int(os.path.splitext(name)[0])] = os.path.join(root, split, folder, name)
    if sorted(paths) != list(range(n)):
        raise SystemExit(f"{root}/{split} holds {len(paths)} images, not the {n} of these flags (--train-images/--val-images)")
    return torch.stack([torch.from_numpy(np.array(Image.open(paths[i]).convert("RGB"))).permute(2, 0, 1)
                        for i in range(n)])


def attribute_labels(draws: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Per split, integer labels of every attribute: the discrete ones as drawn, the continuous ones (paper
    brightness, x, y) as terciles of the training split."""
    out: dict[str, dict[str, torch.Tensor]] = {s: {} for s in draws}
    for key in draws["train"]:
        values = draws["train"][key]
        if values.is_floating_point():
            edges = torch.quantile(values.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
            for s in draws:
                out[s][key] = torch.bucketize(draws[s][key].double(), edges)
        else:
            for s in draws:
                out[s][key] = draws[s][key].long()
    return out


@torch.no_grad()
def backbone_features(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The query encoder's pooled backbone features (N x d) of normalised images, in eval mode."""
    encoder = model.encoder_q.eval()
    seen: list[torch.Tensor] = []
    hook = encoder.avgpool.register_forward_hook(lambda m, i, o: seen.append(o.flatten(1)))
    for chunk in images.split(batch):
        encoder(chunk)
    hook.remove()
    return torch.cat(seen)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="the folder demo_imagefolder.py wrote (with train/ and val/)")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files, or 'random' (shaped like the first file)")
    p.add_argument("--anywhere", action="store_true", help="the folder was written with --anywhere")
    p.add_argument("--no-clutter", action="store_true", help="the folder was written with --no-clutter")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", default=default_out("digits_nuisance.json"))
    opts = p.parse_args(argv)
    counts = {"train": opts.train_images, "val": opts.val_images}
    drawn: dict[str, torch.Tensor] = {}
    draws = write_digits(None, counts, clutter=not opts.no_clutter, anywhere=opts.anywhere, images_out=drawn)
    labels = attribute_labels(draws)
    raw = {s: load_split(opts.data, s, counts[s]) for s in counts}
    for s in counts:  # the folder on disk is the one these draws wrote (PNG is lossless)
        if not torch.equal(raw[s], drawn[s]):
            raise SystemExit(f"{opts.data}/{s}: its images differ from the re-drawn ones; pass the flags it was "
                             f"written with (--anywhere, --no-clutter, --train-images, --val-images)")
    transform = eval_transform(opts.image_size)
    inputs = {s: torch.stack([transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in raw[s]]) for s in raw}

    files = [c for c in opts.checkpoints if c != "random"]
    like = load_checkpoint(files[0]) if files else None
    rows: dict[str, dict[str, float]] = {}
    chance = {k: float(torch.bincount(v).max()) / len(v) * 100 for k, v in labels["val"].items()}
    for name in ["raw_pixels", *opts.checkpoints]:
        if name == "raw_pixels":
            feats = {s: inputs[s].flatten(1) for s in inputs}
        else:
            torch.manual_seed(0)  # the random init, as the run's final report seeds it (--seed 0)
            model = load_model(name, like)[0]
            feats = {s: backbone_features(model, inputs[s]) for s in inputs}
        train, val = F.normalize(feats["train"], dim=1), F.normalize(feats["val"], dim=1)
        rows[name] = {k: knn_accuracy(train, labels["train"][k], val, labels["val"][k], 20, 0.07) for k in labels["val"]}
        print(name, {k: round(v, 1) for k, v in rows[name].items()}, flush=True)
    print("majority class", {k: round(v, 1) for k, v in chance.items()})
    result = {"hardware": hardware(), "data": opts.data, "anywhere": opts.anywhere, "no_clutter": opts.no_clutter,
              "majority_class": chance, "knn_top1": rows}
    write_json(result, opts.out)
    return result


if __name__ == "__main__":
    cli(main)
