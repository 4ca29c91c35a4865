#!/usr/bin/env python
"""Has a pretraining run collapsed its features? Effective rank and mean cosine of a checkpoint's features.

For each checkpoint (and ``random`` for a fresh MoCo of the first checkpoint's architecture), on up to ``--images``
center crops of an ImageFolder split: the query encoder's head output (what InfoNCE sees, L2-normalised) and its
backbone features (what kNN and the linear probe read), each summarised by
- the effective rank ``(sum s)^2 / sum s^2`` of the centred features' singular values s (1 = every image on one
  line; the feature dimension = spread evenly), and
- the mean cosine between images (1 = all the same direction; ~0 = spread over the sphere).
A healthy contrastive run spreads its head output (mean cosine near 0); a run whose loss stays near
ln(1 + --pcl-r) keeps it in a few directions.

    python experiments/feature_rank.py exp/paper_digits/data/val random exp/paper_digits/run/checkpoint_last.pth.tar
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import cli, default_out, write_json
from pcl.checkpoint import load_checkpoint, load_model_state
from pcl.data import eval_transform, image_folder
from pcl.model import MoCo


def effective_rank(x: torch.Tensor) -> float:
    """(sum s)^2 / sum s^2 of the singular values of the centred rows of ``x`` (N x C)."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    return float(s.sum() ** 2 / (s ** 2).sum())


def mean_cosine(x: torch.Tensor) -> float:
    z = F.normalize(x.double(), dim=1)
    return float((z @ z.T).mean())


def load_model(path: str, like: dict | None) -> tuple[MoCo, bool]:
    """(model, grey): the checkpoint's MoCo, or with path 'random' a fresh one shaped like ``like``'s args."""
    ckpt = None if path == "random" else load_checkpoint(path)
    a = (ckpt or like or {}).get("args")
    if a is None:
        raise SystemExit(f"{path}: no pretraining 'args' to build the model from (give a checkpoint first)")
    model = MoCo(a["arch"], a["low_dim"], a["pcl_r"], a["moco_m"], a["mlp"], a["width"], a["stem"])
    if ckpt is not None:
        load_model_state(model, ckpt["state_dict"], path)
    return model, a["dataset"] in ("mnist", "fashion-mnist", "kmnist")


@torch.no_grad()
def summarise(model: MoCo, images: torch.Tensor) -> dict[str, float]:
    encoder = model.encoder_q.eval()
    seen: dict[str, torch.Tensor] = {}
    hook = encoder.avgpool.register_forward_hook(lambda m, i, o: seen.__setitem__("backbone", o.flatten(1)))
    head = encoder(images)
    hook.remove()
    return {"head_rank": effective_rank(head), "head_mean_cos": mean_cosine(head),
            "backbone_rank": effective_rank(seen["backbone"]), "backbone_mean_cos": mean_cosine(seen["backbone"])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("split", help="an ImageFolder split (class folders of images), e.g. DIR/val")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files, or 'random' (shaped like the first file)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=default_out("feature_rank.json"))
    opts = p.parse_args(argv)
    root, split = os.path.split(os.path.normpath(opts.split))
    data = image_folder(root, split)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(opts.seed))[:opts.images]
    transform = eval_transform(opts.image_size)
    pil = [data[int(i)][0] for i in pick]
    stacks = {grey: torch.stack([transform(im.convert("L").convert("RGB") if grey else im) for im in pil])
              for grey in (False, True)}  # the MNIST family trains on grey images expanded to 3 channels
    files = [c for c in opts.checkpoints if c != "random"]
    like = load_checkpoint(files[0]) if files else None
    rows = {}
    for path in opts.checkpoints:
        model, grey = load_model(path, like)
        rows[path] = summarise(model, stacks[grey])
        print(path, {k: round(v, 3) for k, v in rows[path].items()}, flush=True)
    result = {"split": opts.split, "images": len(pick), "rows": rows}
    write_json(result, opts.out)
    return result


if __name__ == "__main__":
    cli(main)
