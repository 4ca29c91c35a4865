"""See what a checkpoint learned: prototype galleries, the paper's t-SNE figure and retrieval grids, as PNGs.

    python -m pcl.evaluation.visualize --pretrained exp/fmnist/checkpoint_last.pth.tar \\
        --dataset fashion-mnist /usr/share/datasets/fashion-mnist --exp-dir exp/fmnist/visualize

Writes to --exp-dir:
- ``gallery_k{k}.png`` per granularity: prototypes (rows: 8 drawn with --seed, the largest, the smallest) by
  their members nearest to the prototype (columns). From the checkpoint's own E-step result (its assignment
  and phi; members ranked by distance to the cluster's mean backbone feature) when it holds one for this
  training set, else from a fresh k-means on the backbone features (--num-cluster, default the number of
  classes);
- ``tsne.png``: t-SNE of the test features of up to --tsne-samples images (seeded), coloured by label (when the
  set has labels) and by k-means cluster;
- ``retrieval.png``: --queries test images (seeded) and their nearest training images by the learned features,
  next to the same by raw pixels (or a random init, --compare random); a green frame marks a neighbour of the
  query's class, red another class;
- ``visualize.json``: the paths and the retrieval precision (share of neighbours of the query's class) of both.
matplotlib draws the t-SNE figure (``pip install -e ".[plots]"``); the galleries and grids need only Pillow.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from typing import Any

import torch

from pcl import PCLError, distributed as dist_utils
from pcl.config import RunConfig, parse_list, parse_num_cluster
from pcl.settings import DistSettings
from pcl.evaluation.common import eval_backbone, follow_checkpoint, resolve_eval_dataset
from pcl.features import extract_features
from pcl.gallery import GalleryRow, display_images, gallery_rows, render_gallery, render_grid
from pcl.log import write_atomic, write_json

logger = logging.getLogger("pcl")


def build_parser() -> argparse.ArgumentParser:
    from pcl.config import add_unlabelled_flag, eval_command_parser

    p = eval_command_parser("Prototype galleries, t-SNE and retrieval grids of a checkpoint (PNGs)", spawns=False)
    add_unlabelled_flag(p)
    p.add_argument("--num-cluster", default="", type=str,
                   help="k of a fresh k-means for the galleries (comma-separated); default: the checkpoint's own "
                        "E-step result for this set, else the number of classes, else 10")
    p.add_argument("--gallery-rows", default=8, type=int, help="prototypes drawn per gallery (plus largest, smallest)")
    p.add_argument("--columns", default=8, type=int, help="members shown per prototype / neighbours per query")
    p.add_argument("--tsne-samples", default=None, type=int, help="test images in the t-SNE figure (default: "
                                                                  "min(2000, test set))")
    p.add_argument("--queries", default=8, type=int, help="query images of the retrieval grid")
    p.add_argument("--compare", default="raw", choices=["raw", "random"],
                   help="what the retrieval grid sets next to the learned features")
    p.add_argument("--only", default="gallery,tsne,retrieval", help="comma-separated subset of the three figures")
    return p


class _Split:
    """One split: its evaluation loader (center crops, in order, yields images/labels/index) and labels."""

    def __init__(self, loader, labels: torch.Tensor) -> None:
        self.loader, self.labels = loader, labels

    def __len__(self) -> int:
        return len(self.labels)


def load_splits(args: RunConfig) -> tuple[_Split, _Split, bool]:
    """(train, test, labelled). Without a test split the training split serves as both (queries then never
    retrieve themselves). ``labelled``: the set has more than one class."""
    from pcl.data import FileLoader, LabelledDataset, TensorLabelledLoader, data_settings, file_sets, eval_transform, load_in_memory
    from pcl.data.datasets import data_root
    from pcl.data.registry import spec

    if spec(args.dataset, "data").in_memory:
        sets = load_in_memory(data_settings(args))
        train = _Split(TensorLabelledLoader(sets["train"], sets["train_labels"], args.batch_size), sets["train_labels"])
        test = _Split(TensorLabelledLoader(sets["test"], sets["test_labels"], args.batch_size), sets["test_labels"])
    else:
        data_root(args.data, args.dataset)
        base_train, base_test = file_sets(data_settings(args), labelled=False)
        if len(base_train) == 0:
            raise PCLError(f"the training set in {args.data} is empty")

        def split(base) -> _Split:
            ds = LabelledDataset(base, eval_transform(args.image_size))
            return _Split(FileLoader(ds, args.batch_size, args.workers, args.seed, train=False, drop_last=False,
                                     timeout_min=args.loader_timeout),
                          ds.targets)

        train = split(base_train)
        test = split(base_test) if base_test is not None and len(base_test) else train
    labelled = int(torch.unique(train.labels).numel()) > 1
    return train, test, labelled


@torch.no_grad()
def features(encoder, split: _Split, device: torch.device, desc: str) -> torch.Tensor:
    """L2-normalised pooled features (``encoder`` None: the pixels) of a split, in dataset order: N x d, on the CPU."""
    return extract_features(encoder, split.loader, device, len(split), progress=sys.stderr.isatty(), desc=desc).cpu()


def checkpoint_clusters(path: str, n: int) -> dict | None:
    """The checkpoint's E-step result when it has one for a training set of n samples."""
    if not path:
        return None
    from pcl.checkpoint import check_cluster_result, load_checkpoint

    result = load_checkpoint(path).get("cluster_result")
    if result:
        check_cluster_result(result, path)
    if not result or any(len(a) != n for a in result["im2cluster"]):
        return None
    return result


def galleries(feats: torch.Tensor, train: _Split, args: RunConfig, labelled: bool) -> dict[int, list[GalleryRow]]:
    """Gallery rows per k, from the checkpoint's clusters or a fresh k-means on the backbone features."""
    from pcl.cluster import run_kmeans

    saved = checkpoint_clusters(args.pretrained, feats.shape[0])
    given = list(parse_num_cluster(args.num_cluster)) if args.num_cluster else None
    if saved is not None and given is not None and given != [len(phi) for phi in saved["density"]]:
        logger.info("--num-cluster %s: a fresh k-means (the checkpoint's saved E-step has k=%s)", args.num_cluster,
                    ",".join(str(len(phi)) for phi in saved["density"]))
        saved = None
    out = {}
    if saved is not None:
        for assign, phi in zip(saved["im2cluster"], saved["density"]):
            k = len(phi)
            sums = torch.zeros(k, feats.shape[1]).index_add_(0, assign, feats)
            means = sums / torch.bincount(assign, minlength=k).clamp_min(1)[:, None]  # backbone-space centroids
            out[k] = gallery_rows(feats, assign, means, phi, args.gallery_rows, args.columns, args.seed)
        return out
    ks = given or [min(int(torch.unique(train.labels).numel()) if labelled else 10, feats.shape[0])]
    result = run_kmeans(feats, ks, 0.2, seed=args.seed % 2 ** 31, niter=20, nredo=1)
    for k, assign, cent, phi in zip(ks, result.im2cluster, result.centroids, result.concentration):
        out[k] = gallery_rows(feats, assign, cent, phi, args.gallery_rows, args.columns, args.seed)
    return out


def tsne_figure(feats: torch.Tensor, labels: torch.Tensor | None, clusters: torch.Tensor, path: str, seed: int,
                title: str) -> None:
    """The paper's figure: a 2-D t-SNE of the features, coloured by label (if any) and by cluster."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PCLError("the t-SNE figure needs matplotlib: pip install -e \".[plots]\" (or --only gallery,retrieval)") from None
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = feats.numpy()
    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(50, random_state=seed % 2 ** 32).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3)))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed % 2 ** 32).fit_transform(x)
    panels = ([("class label", labels)] if labels is not None else []) + [("k-means cluster", clusters)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False)
    for ax, (name, colour) in zip(axes[0], panels):
        ax.scatter(xy[:, 0], xy[:, 1], c=colour.numpy(), cmap="tab10" if int(colour.max()) < 10 else "tab20",
                   s=max(3.0, min(12.0, 6000 / len(xy))), alpha=0.8, linewidths=0)
        ax.set_title(f"coloured by {name}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    finally:
        plt.close(fig)


def frame(pics: torch.Tensor, good: list[bool] | None) -> torch.Tensor:
    """A 3 px green (same class) or red (other class) frame around each picture."""
    if good is None:
        return pics
    pics = pics.clone()
    for pic, ok in zip(pics, good):
        colour = torch.tensor([40, 200, 60] if ok else [220, 40, 40], dtype=torch.uint8).view(3, 1, 1)
        pic[:, :3], pic[:, -3:], pic[:, :, :3], pic[:, :, -3:] = colour, colour, colour, colour
    return pics


def retrieval(query_feats: dict[str, torch.Tensor], bank_feats: dict[str, torch.Tensor], train: _Split,
              test: _Split, queries: list[int], args: RunConfig, labelled: bool, same_set: bool,
              path: str) -> dict[str, float]:
    """Grid: each query, then its nearest training images by each feature set; returns the precision of each."""
    rows, labels, precision = [], [], {}
    neighbours = {}
    for name in query_feats:
        sim = query_feats[name][queries] @ bank_feats[name].t()
        if same_set:
            sim[torch.arange(len(queries)), torch.as_tensor(queries)] = -2.0  # never retrieve the query itself
        neighbours[name] = sim.topk(args.columns, dim=1).indices
        if labelled:
            hits = train.labels[neighbours[name]] == test.labels[torch.as_tensor(queries)][:, None]
            precision[name] = float(hits.float().mean() * 100)
    for i, q in enumerate(queries):
        query = display_images(test.loader, [q])
        query[:, :, :3], query[:, :, -3:], query[:, :, :, :3], query[:, :, :, -3:] = 255, 255, 255, 255  # white frame
        for name, idx in neighbours.items():  # one row per feature set: the query, then its neighbours
            good = (train.labels[idx[i]] == test.labels[q]).tolist() if labelled else None
            rows.append(torch.cat([query, frame(display_images(train.loader, idx[i].tolist()), good)]))
            labels.append(f"query {q}" + (f" (class {int(test.labels[q])})" if labelled else "") + f"\n{name}"
                          + (f"\n{precision_row(good)}" if good is not None else ""))
    grid = render_grid(rows, labels, args.columns + 1, label_width=140)
    save_png(grid, path)
    return precision


def precision_row(good: list[bool]) -> str:
    return f"{sum(good)}/{len(good)} same class"


def save_png(image: torch.Tensor, path: str) -> None:
    from PIL import Image

    write_atomic(path, lambda f: Image.fromarray(image.permute(1, 2, 0).numpy()).save(f, format="PNG"), binary=True)


def validate(args: RunConfig) -> list[str]:
    figures = ("gallery", "tsne", "retrieval")
    only = parse_list(args.only, "--only", str, ",".join(figures), lambda w: w in figures,
                      ": choose from gallery, tsne, retrieval")
    if args.world_size > 1:
        raise PCLError("visualize runs in one process: drop --world-size")
    return only


def _tsne(test_feats: torch.Tensor, test: _Split, n_tsne: int, args: RunConfig, labelled: bool,
          same_set: bool) -> str:
    """tsne.png of n_tsne seeded test images, coloured by label (if any) and by a k-means of them."""
    from pcl.cluster import kmeans

    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:n_tsne]
    k = int(torch.unique(test.labels).numel()) if labelled else 10
    clusters = kmeans(test_feats[pick], min(k, n_tsne), seed=args.seed % 2 ** 31, nredo=1)[2].cpu()
    path = os.path.join(args.exp_dir, "tsne.png")
    tsne_figure(test_feats[pick], test.labels[pick] if labelled else None, clusters, path, args.seed,
                f"t-SNE of {n_tsne} {'training' if same_set else 'test'} images: {args.pretrained or 'random init'}")
    return path


def _retrieval(encoder: torch.nn.Module, train: _Split, test: _Split, train_feats: torch.Tensor,
               test_feats: torch.Tensor, args: RunConfig, labelled: bool, same_set: bool,
               device: torch.device) -> tuple[str, dict[str, float]]:
    """retrieval.png: learned features next to raw pixels or a random init; (its path, precision per set)."""
    # its own stream: the queries do not depend on which other figures --only asks for
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed + 1))
    queries = order[:args.queries].tolist()
    other = "raw pixels" if args.compare == "raw" else "random init"
    net = None
    if args.compare != "raw":
        net = copy.deepcopy(encoder)  # the same architecture, freshly initialised (seeded)
        torch.manual_seed(args.seed + 1)
        for module in net.modules():
            if module is not net and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    other_train = features(net, train, device, other)
    other_test = other_train if same_set else features(net, test, device, f"{other} (test)")
    path = os.path.join(args.exp_dir, "retrieval.png")
    precision = retrieval({"learned": test_feats, other: other_test}, {"learned": train_feats, other: other_train},
                          train, test, queries, args, labelled, same_set, path)
    return path, precision


def run(args: RunConfig) -> dict[str, Any]:
    from pcl.log import setup_logging

    args = RunConfig.of(args)
    args = args.replace(dataset=resolve_eval_dataset(args))
    only = validate(args)
    setup_logging(args.exp_dir, args.debug)
    args = follow_checkpoint(args)
    device = dist_utils.init(DistSettings.of(args))
    encoder = eval_backbone(args, device)  # cheap input first: a bad checkpoint fails before the dataset is read
    train, test, labelled = load_splits(args)
    same_set = test is train
    n_tsne = args.tsne_samples if args.tsne_samples is not None else min(2000, len(test))
    if "tsne" in only and n_tsne > len(test):
        raise PCLError(f"--tsne-samples {n_tsne} is larger than the {len(test)} images of the "
                       f"{'training' if same_set else 'test'} split; choose at most {len(test)}")
    if "retrieval" in only and args.queries > len(test):
        raise PCLError(f"--queries {args.queries} is larger than the {len(test)} images to query from")
    neighbours = len(train) - (1 if same_set else 0)  # a query from the training set is never its own neighbour
    if "retrieval" in only and args.columns > neighbours:
        raise PCLError(f"--columns {args.columns}: there are only {neighbours} training images to retrieve per query; "
                       f"choose at most {neighbours}")
    ks = parse_num_cluster(args.num_cluster) if args.num_cluster else ()
    if "gallery" in only and ks and max(ks) > len(train):
        raise PCLError(f"--num-cluster {args.num_cluster}: k={max(ks)} is larger than the {len(train)} training "
                       f"images; choose every k <= {len(train)}")
    if not labelled:
        logger.info("the set has no class labels: plots are coloured by cluster only, no retrieval precision")
    os.makedirs(args.exp_dir, exist_ok=True)
    train_feats = features(encoder, train, device, "features (train)")
    test_feats = train_feats if same_set else features(encoder, test, device, "features (test)")
    out: dict[str, Any] = {"pretrained": args.pretrained, "labelled": labelled, "files": {}}
    if "gallery" in only:
        for k, rows in galleries(train_feats, train, args, labelled).items():
            path = os.path.join(args.exp_dir, f"gallery_k{k}.png")
            save_png(render_gallery(rows, train.loader, args.columns), path)
            out["files"][f"gallery_k{k}"] = path
    if "tsne" in only:
        out["files"]["tsne"] = _tsne(test_feats, test, n_tsne, args, labelled, same_set)
    if "retrieval" in only:
        path, precision = _retrieval(encoder, train, test, train_feats, test_feats, args, labelled, same_set, device)
        if precision:  # only with labels
            out["retrieval_precision"] = precision
        out["files"]["retrieval"] = path
    write_json(os.path.join(args.exp_dir, "visualize.json"), out)
    for name, path in out["files"].items():
        print(f"{name}: {path}")
    if out.get("retrieval_precision"):
        print("retrieval precision (neighbours of the query's class): " +
              ", ".join(f"{k} {v:.1f}%" for k, v in out["retrieval_precision"].items()))
    return out


if __name__ == "__main__":
    from pcl.launch import main

    sys.exit(main(build_parser, run, one_process="python -m pcl.evaluation.visualize"))
