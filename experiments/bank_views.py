#!/usr/bin/env python
"""Why features from the bank cluster worse than the official feature pass, measured on one checkpoint: with the
checkpoint's weights frozen, the k-means NMI (with the labels) of the training set's features taken each way.

Rows: ``pass`` (the key encoder on the whole images, eval-mode BatchNorm: what ``--estep-features pass`` clusters
on the in-memory sets); ``saved bank`` (the checkpoint's own bank, written by the training steps over its last
epoch, when it has one); and, with the frozen weights: the key of one augmented view (eval-mode or training-mode
BatchNorm), the mean of two augmented views' keys, the mean of a view's key and another view's query (what
``--bank-views pair`` keeps), and the mean of three views' keys. Each is L2-normalised, clustered at ``--ks``
(faiss or torch, ``--nredo`` restarts), and scored by NMI (percent) with the labels; its mean cosine to ``pass``
says how far it lies from the pass's features. A row near ``1 aug view`` for the saved bank says the gap is the
single augmented view, not the encoder's drift over the epoch or its BatchNorm mode.

    python experiments/bank_views.py EXP/checkpoint_0008.pth.tar --data DIR --out exp/results/bank_views.json
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
import torch.nn.functional as F

from study import cli, default_out, write_json
from pcl.checkpoint import load_checkpoint
from pcl.cluster import run_kmeans
from pcl.config import build_pretrain_parser, parse_args
from pcl.data import TensorAugment, data_settings, load_in_memory
from pcl.features import nmi
from pcl.model import MoCo


def moco_from(ckpt: dict[str, Any]) -> tuple[MoCo, dict[str, Any]]:
    """The checkpoint's MoCo model (its saved settings) and those settings."""
    a = ckpt["args"]
    model = MoCo(a["arch"], a["low_dim"], a["pcl_r"], a["moco_m"], a["mlp"], a["width"], a["stem"],
                 a.get("bn_splits") or 8)
    model.load_state_dict({k.replace("module.", "", 1): v for k, v in ckpt["state_dict"].items()})
    return model, a


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor],
           train_bn: bool, batch: int = 512, splits: int = 8) -> torch.Tensor:
    """L2-normalised ``encoder(view(images))`` in batches (eval- or training-mode BatchNorm, nothing updated that
    matters: the model is thrown away). In training mode a last batch the BatchNorm splits do not divide is
    topped up with the first images, whose rows are dropped."""
    encoder.train(train_bn)
    rows = []
    for s in range(0, images.shape[0], batch):
        x = images[s:s + batch]
        short = (-x.shape[0]) % splits if train_bn else 0
        out = F.normalize(encoder(view(torch.cat([x, images[:short]]))), dim=1)
        rows.append(out[:x.shape[0]])
    return torch.cat(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="the training set's folder (default: the checkpoint's)")
    p.add_argument("--ks", default="10,100")
    p.add_argument("--nredo", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=default_out("bank_views.json"))
    opts = p.parse_args(argv)
    ckpt = load_checkpoint(opts.checkpoint)
    model, a = moco_from(ckpt)
    argv_data = ["--dataset", a["dataset"], "--image-size", str(a["image_size"])]
    if a["dataset"] == "demo":
        argv_data += ["--demo-renders", str(a.get("demo_renders") or 4)]
    else:
        argv_data.append(opts.data or a["data"])
    sets = load_in_memory(data_settings(parse_args(build_pretrain_parser(), argv_data)))
    images, labels = sets["train"], sets["train_labels"]
    augment = TensorAugment(a["image_size"], a["aug_plus"], a["crop_min_scale"], hue=a.get("hue_space", "hsv"))
    gen = torch.Generator().manual_seed(opts.seed)
    whole = TensorAugment(a["image_size"], False, color=False).normalise
    views = lambda: (lambda x: augment(x, gen))  # noqa: E731 (a fresh draw per call)
    key, query = model.encoder_k, model.encoder_q
    rows: dict[str, torch.Tensor] = {"pass": encode(key, images, whole, False)}
    if "estep_bank" in ckpt:
        rows["saved bank"] = F.normalize(ckpt["estep_bank"]["features"].float(), dim=1)
    one, two, three = (encode(key, images, views(), False) for _ in range(3))
    rows["1 aug view"] = one
    rows["1 aug view, training-mode BN"] = encode(key, images, views(), True, splits=a.get("bn_splits") or 8)
    rows["mean of 2 views"] = F.normalize(one + two, dim=1)
    rows["key + query of another view"] = F.normalize(one + encode(query, images, views(), False), dim=1)
    rows["mean of 3 views"] = F.normalize(one + two + three, dim=1)
    ks = [int(k) for k in opts.ks.split(",")]
    out: dict[str, Any] = {"checkpoint": opts.checkpoint, "ks": ks, "rows": {}}
    print(f"| features | cosine to pass | " + " | ".join(f"NMI k={k}" for k in ks) + " |\n|---|---|" + "---|" * len(ks))
    for name, x in rows.items():
        scores = {}
        for k in ks:
            result = run_kmeans(x, [k], 0.2, seed=opts.seed, niter=20, nredo=opts.nredo)
            scores[k] = nmi(result.im2cluster[0], labels)
        cosine = float((x * rows["pass"]).sum(1).mean())
        out["rows"][name] = {"cosine_to_pass": cosine, **{f"nmi_k{k}": v for k, v in scores.items()}}
        print(f"| {name} | {cosine:.3f} | " + " | ".join(f"{v:.1f}" for v in scores.values()) + " |", flush=True)
    write_json(out, opts.out)
    return out


if __name__ == "__main__":
    cli(main)
