#!/usr/bin/env python
"""What do the demo's clusters and features follow: the digit, or the renderer's nuisances?

The demo renders each digit with a random background colour, foreground colour, scale and position, all
drawn independently of the digit. For each checkpoint given, this script:
- clusters the key encoder's features of the training renders (what the E-step clusters, k = the config's
  granularities, faiss with the official settings) and reports the adjusted mutual information (AMI) of the
  clusters with the digit and with each nuisance, binned: background / foreground colour (each RGB channel
  above or below 0.5: 8 bins), scale (4 quantile bins), position (3 x 3 grid);
- reports the kNN top-1 (k = 20, cosine) with which the learned backbone features of the test renders
  predict each of the same variables (chance: 1 / bins).

    python experiments/demo_diagnosis.py exp/demo/checkpoint_0009.pth.tar exp/demo/checkpoint_0029.pth.tar
"""

from __future__ import annotations

import argparse
import os

import torch

# study first: it puts this checkout (and benchmarks/common.py) on sys.path
from study import cli, write_json
from pcl import checkpoint as ckpt_io
from pcl.cluster import kmeans
from pcl.data import TensorEvalLoader, make_digits_demo
from pcl.evaluation.knn import knn_accuracy
from pcl.model import MoCo
from pcl.features import extract_features
from pcl.settings import parse_list


def nuisance_bins(nuisance: torch.Tensor) -> dict[str, torch.Tensor]:
    """N x 9 (bg RGB, fg RGB, scale, cx, cy) -> integer bins per variable."""
    bits = torch.tensor([4, 2, 1])
    scale = nuisance[:, 6].contiguous()
    scale_edges = scale.quantile(torch.tensor([0.25, 0.5, 0.75]))
    pos = lambda v: torch.bucketize(v.contiguous(), torch.tensor([-1 / 3, 1 / 3]))  # noqa: E731
    return {"background colour": ((nuisance[:, 0:3] > 0.5).long() * bits).sum(1),
            "foreground colour": ((nuisance[:, 3:6] > 0.5).long() * bits).sum(1),
            "scale": torch.bucketize(scale, scale_edges),
            "position": pos(nuisance[:, 7]) * 3 + pos(nuisance[:, 8])}


@torch.no_grad()
def key_features(ckpt: dict, images: torch.Tensor) -> torch.Tensor:
    """The momentum encoder's L2-normalised features (what the E-step clusters), N x low_dim."""
    cfg, args = ckpt.get("model_config", {}), ckpt.get("args", {})
    model = MoCo(ckpt["arch"], cfg.get("low_dim", 128), args.get("pcl_r", 16), 0.99, cfg.get("mlp", False),
                 cfg.get("width", 64), cfg.get("stem", "standard"), 1)
    ckpt_io.load_model_state(model, ckpt["state_dict"], "checkpoint")
    model.eval()
    loader = TensorEvalLoader(images, 512, shard=False)
    return extract_features(model.encode_key, loader, torch.device("cpu"), images.shape[0], normalize=False)


@torch.no_grad()
def backbone_features(path: str, images: torch.Tensor) -> torch.Tensor:
    loader = TensorEvalLoader(images, 512, shard=False)
    return extract_features(ckpt_io.load_backbone(path), loader, torch.device("cpu"), images.shape[0])


def diagnose(path: str, demo: dict, ks: list[int]) -> dict:
    from sklearn.metrics import adjusted_mutual_info_score

    ckpt = ckpt_io.load_checkpoint(path)
    train_vars = {"digit": demo["train_labels"], **nuisance_bins(demo["train_nuisance"])}
    test_vars = {"digit": demo["test_labels"], **nuisance_bins(demo["test_nuisance"])}
    feats = key_features(ckpt, demo["train"])
    clusters = {}
    for k in ks:
        assign = kmeans(feats, k, seed=0, niter=20, nredo=5, backend="auto")[2].numpy()
        clusters[k] = {name: round(100 * adjusted_mutual_info_score(v.numpy(), assign), 2)
                       for name, v in train_vars.items()}
    bank, test = backbone_features(path, demo["train"]), backbone_features(path, demo["test"])
    knn = {name: round(knn_accuracy(bank, train_vars[name], test, test_vars[name], 20, 0.07), 2) for name in train_vars}
    return {"checkpoint": path, "epoch": ckpt["epoch"], "cluster_ami": clusters, "knn_top1": knn,
            "chance": {name: round(100 / int(v.max() + 1), 1) for name, v in test_vars.items()}}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--num-cluster", default="20,40,80")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--demo-renders", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON file for the results")
    opts = p.parse_args(argv)
    demo = make_digits_demo(renders_train=opts.demo_renders, size=opts.image_size, seed=0)
    ks = parse_list(opts.num_cluster, "--num-cluster")
    results = [diagnose(path, demo, ks) for path in opts.checkpoints]
    names = list(results[0]["knn_top1"])
    print("\nAMI (%) of the E-step's clusters with each variable of the training renders:\n")
    print("| checkpoint | epoch | k | " + " | ".join(names) + " |\n|" + "---|" * (3 + len(names)))
    for r in results:
        for k, row in r["cluster_ami"].items():
            print(f"| {os.path.basename(os.path.dirname(r['checkpoint']))} | {r['epoch']} | {k} | "
                  + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
    print("\nkNN top-1 (%) predicting each variable of the test renders from the backbone features:\n")
    print("| checkpoint | epoch | " + " | ".join(names) + " |\n|" + "---|" * (2 + len(names)))
    print("| chance | - | " + " | ".join(f"{results[0]['chance'][n]:.1f}" for n in names) + " |")
    for r in results:
        print(f"| {os.path.basename(os.path.dirname(r['checkpoint']))} | {r['epoch']} | "
              + " | ".join(f"{r['knn_top1'][n]:.1f}" for n in names) + " |")
    if opts.out:
        write_json(results, opts.out)
    return results


if __name__ == "__main__":
    cli(main)
