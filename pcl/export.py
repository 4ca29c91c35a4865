"""Export a checkpoint's query backbone for downstream use: a torchvision state_dict (.pth) or a detectron2
pickle (.pkl), the conversion of MoCo's ``convert-pretrain-to-detectron2.py``.

    python -m pcl.export CHECKPOINT OUT [--format torchvision|detectron2] [-a ARCH] [--force]
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
from typing import Any

import torch

from pcl import PCLError
from pcl.checkpoint import load_backbone, load_checkpoint, save_checkpoint
from pcl.settings import RunConfig, cannot_read

logger = logging.getLogger("pcl")


def torchvision_state(path: str, arch: str | None = None) -> dict[str, torch.Tensor]:
    """The query backbone as a plain torchvision ResNet state_dict (no ``fc``: load with strict=False, or
    give the model ``fc = nn.Identity()`` and load with strict=True)."""
    backbone = load_backbone(path, arch)
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def detectron2_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """torchvision ResNet keys -> detectron2's (the mapping of MoCo's convert-pretrain-to-detectron2.py):
    stem.conv1, resN for layerN-1, convK.norm for bnK, shortcut(.norm) for downsample.0/1; numpy values."""
    model = {}
    for key, value in state.items():
        name = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            name = name.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            name = name.replace(f"bn{t}", f"conv{t}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[name] = value.cpu().numpy()
    return {"model": model, "__author__": "PCL", "matching_heuristics": True}


def backbone_shape(state: dict[str, torch.Tensor]) -> tuple[int, str] | None:
    """(width, stem) of a ResNet state_dict, read off ``conv1.weight`` (W x 3 x 7 x 7: standard stem, 3 x 3:
    small); None when it has no such tensor. torchvision builds only width 64 with the standard stem."""
    conv1 = state.get("conv1.weight")
    if not torch.is_tensor(conv1) or conv1.dim() != 4:
        return None
    return int(conv1.shape[0]), "small" if conv1.shape[-1] == 3 else "standard"


def export(path: str, out: str, fmt: str = "torchvision", arch: str | None = None, force: bool = False) -> str:
    """Write the backbone of checkpoint ``path`` as a torchvision state_dict (.pth) or a detectron2 .pkl. OUT must
    not be ``path`` itself, nor (unless ``force``) another pretraining checkpoint: the export would replace it."""
    return export_backbone(path, out, fmt, arch, force)[0]


def export_backbone(path: str, out: str, fmt: str = "torchvision", arch: str | None = None, force: bool = False
                    ) -> tuple[str, str]:
    """:func:`export`, plus what was written in words. A backbone torchvision cannot build (a width other than 64,
    the small stem: the CPU presets') is written as what it is: a pcl backbone file with its builder settings
    (``arch``, ``model_config``), which :func:`pcl.checkpoint.load_backbone` reads; detectron2 is refused for it."""
    if os.path.isdir(out):
        raise PCLError(f"export output {out} is a directory: give a file name, e.g. {os.path.join(out, 'backbone.pth')}")
    _refuse_overwriting_a_checkpoint(path, out, force)
    if fmt not in ("torchvision", "detectron2"):
        raise PCLError(f"unknown export format '{fmt}': use torchvision or detectron2")
    state = torchvision_state(path, arch)
    shape = backbone_shape(state)
    what, payload = fmt, state
    if shape not in (None, (64, "standard")):
        arch = arch or load_checkpoint(path).get("arch")
        built = f"{arch} of width {shape[0]} with the {shape[1]} stem"
        if fmt == "detectron2":
            raise PCLError(f"{path} holds a {built}: detectron2's ResNet configs build width 64 with the standard "
                           f"stem only; export it as .pth and load it with pcl.checkpoint.load_backbone")
        payload = {"arch": arch, "model_config": {"width": shape[0], "stem": shape[1]}, "state_dict": state}
        what = (f"a pcl backbone, not a torchvision state_dict: torchvision has no {built}; load it with "
                f"pcl.checkpoint.load_backbone({out!r})")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if fmt == "torchvision":
            save_checkpoint(payload, out, last=None)
        else:
            with open(out, "wb") as f:
                pickle.dump(detectron2_state(state), f)
    except OSError as e:  # an unwritable folder (permission denied, read-only file system): one line
        raise cannot_read(out, e, verb="write") from None
    if what == fmt:
        what = ("a torchvision state_dict without fc: give the model fc = nn.Identity(), then load it strict"
                if fmt == "torchvision" else "a detectron2 pickle (the keys of MoCo's converter)")
    logger.info("exported %s (%d tensors) to %s: %s", path, len(state), out, what)
    return out, what


def _refuse_overwriting_a_checkpoint(path: str, out: str, force: bool) -> None:
    """Refuse an OUT that is the input (also through a link) or, unless ``force``, a pretraining checkpoint."""
    if not os.path.exists(out):
        return
    if os.path.realpath(path) == os.path.realpath(out) or (os.path.exists(path) and os.path.samefile(path, out)):
        raise PCLError(f"export output {out} is the input checkpoint {path}: the backbone would replace the "
                       f"pretraining checkpoint; give another output file, e.g. backbone.pth")
    if force:
        return
    try:
        state = load_checkpoint(out).get("state_dict")
    except PCLError:  # not a checkpoint (an older export .pkl, another file): overwritten as before
        return
    keys = [k.removeprefix("module.") for k in state if isinstance(k, str)] if isinstance(state, dict) else []
    if any(k.startswith("encoder_q.") for k in keys):
        raise PCLError(f"export output {out} is a pretraining checkpoint (its state_dict holds encoder_q weights): "
                       f"give another output file, or pass --force to replace it with the backbone")


def build_export_parser() -> argparse.ArgumentParser:
    from pcl.config import Parser

    p = Parser(prog="python -m pcl.export",
                                description="Export a checkpoint's query backbone (projection head dropped)")
    p.add_argument("checkpoint", help="ours or an official PCL/MoCo checkpoint")
    p.add_argument("out", help="output file: .pth (torchvision) or .pkl (detectron2)")
    p.add_argument("--format", default=None, choices=["torchvision", "detectron2"],
                   help="default: detectron2 for a .pkl output, else torchvision")
    p.add_argument("-a", "--arch", default=None, help="architecture (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an OUT that is a pretraining checkpoint")
    p.add_argument("--debug", action="store_true")
    return p


def run_export(args: RunConfig) -> None:
    fmt = args.format or ("detectron2" if args.out.endswith(".pkl") else "torchvision")
    out, what = export_backbone(args.checkpoint, args.out, fmt, args.arch, args.force)
    print(f"wrote {out}: {what}")


if __name__ == "__main__":
    from pcl.launch import run_cli

    sys.exit(run_cli(build_export_parser, run_export))
