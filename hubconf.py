"""torch.hub entry points: a PCL backbone as :func:`pcl.checkpoint.load_backbone` returns it (the query encoder's
ResNet, projection head dropped, pooled features B x d, in eval mode; ``.arch`` names it).

    import torch
    backbone = torch.hub.load("OWNER/REPO", "pcl_v2_resnet50")  # the official PCL v2 weights, downloaded once
    backbone = torch.hub.load("OWNER/REPO", "pcl_v1_resnet50")  # the official PCL v1 weights
    backbone = torch.hub.load("OWNER/REPO", "backbone", checkpoint="exp/demo/checkpoint_last.pth.tar")  # ours
    # from a clone, or with a checkpoint already on disk (nothing is downloaded):
    backbone = torch.hub.load(".", "pcl_v2_resnet50", source="local", checkpoint="PCL_v2_epoch200.pth.tar")

The official checkpoints (ResNet-50, 200 epochs on ImageNet) are fetched from the addresses the official
repository publishes into ``torch.hub.get_dir()/checkpoints`` the first time, and read with ``weights_only=True``.
"""

from __future__ import annotations

import os

import torch

dependencies = ["torch", "torchvision", "numpy", "tqdm"]  # what importing pcl.checkpoint needs

OFFICIAL = {  # published by salesforce/PCL (README); the same links as this repository's README
    "pcl_v1_resnet50": "https://storage.googleapis.com/sfr-pcl-data-research/PCL_checkpoint/PCL_v1_epoch200.pth.tar",
    "pcl_v2_resnet50": "https://storage.googleapis.com/sfr-pcl-data-research/PCL_checkpoint/PCL_v2_epoch200.pth.tar",
}


def backbone(checkpoint: str, arch: str | None = None, width: int | None = None, stem: str | None = None,
             map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The backbone of ``checkpoint`` (a path): one of this repository's (pretraining, linear head, export) or an
    official PCL/MoCo file. arch / width / stem default to the checkpoint's."""
    from pcl.checkpoint import load_backbone

    return load_backbone(checkpoint, arch, map_location, width=width, stem=stem)


def _official(name: str, pretrained: bool, checkpoint: str | None, progress: bool) -> torch.nn.Module:
    """An official ResNet-50: ``checkpoint`` (a local copy) when given, else with ``pretrained`` the published file
    (downloaded into the hub cache once), else randomly initialised."""
    if checkpoint is None and not pretrained:
        from pcl.model import build_backbone

        model = build_backbone("resnet50", 64, "standard")
        model.arch = "resnet50"
        return model.eval()
    return backbone(checkpoint or _download(OFFICIAL[name], progress), "resnet50")


def _download(url: str, progress: bool) -> str:
    """The file at ``url`` in the hub cache (``torch.hub.get_dir()/checkpoints``), fetched when it is not there yet
    (torch writes a temporary file and renames it: an interrupted download leaves no partial checkpoint)."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(url))
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=progress)
    return path


def pcl_v2_resnet50(pretrained: bool = True, checkpoint: str | None = None, progress: bool = True) -> torch.nn.Module:
    """PCL v2 (MLP head, MoCo v2 augmentation, cosine lr), ResNet-50, 200 epochs on ImageNet: the official weights.
    ``checkpoint``: read this local copy instead of downloading; ``pretrained=False``: a random initialisation."""
    return _official("pcl_v2_resnet50", pretrained, checkpoint, progress)


def pcl_v1_resnet50(pretrained: bool = True, checkpoint: str | None = None, progress: bool = True) -> torch.nn.Module:
    """PCL v1, ResNet-50, 200 epochs on ImageNet: the official weights (``checkpoint``, ``pretrained`` as in
    :func:`pcl_v2_resnet50`)."""
    return _official("pcl_v1_resnet50", pretrained, checkpoint, progress)
