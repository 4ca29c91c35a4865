"""torch.hub entry points (hubconf.py), loaded through torch.hub.load from local files: nothing is downloaded; and
what the export says it wrote."""

import os
import shutil

import pytest
import torch

from conftest import ROOT, official_checkpoint
from pcl.checkpoint import load_backbone


def same_features(a, b, size=16):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_hub_backbone_loads_one_of_our_checkpoints(tiny_checkpoint):
    model = torch.hub.load(ROOT, "backbone", source="local", checkpoint=tiny_checkpoint)
    assert model.arch == "resnet18" and not model.training
    assert same_features(model, load_backbone(tiny_checkpoint))


@pytest.fixture(scope="module")
def official_v2(tmp_path_factory):
    """An official PCL v2 checkpoint's layout (ResNet-50, MLP head, both encoders, the queue), as a local file."""
    path = tmp_path_factory.mktemp("official") / "PCL_v2_epoch200.pth.tar"
    official_checkpoint(path, arch="resnet50", mlp=True)
    return str(path)


def test_official_entries_fetch_the_published_file_once_into_the_hub_cache(official_v2, tmp_path, monkeypatch):
    """pretrained=True asks torch.hub for the official address (served here from the local copy), keeps the file in
    the hub cache and reads it from there the next time."""
    fetched = []

    def download(url, dst, progress=True):
        fetched.append(url)
        shutil.copyfile(official_v2, dst)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model = torch.hub.load(ROOT, "pcl_v2_resnet50", source="local", progress=False)
    again = torch.hub.load(ROOT, "pcl_v2_resnet50", source="local", progress=False)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert fetched == ["https://storage.googleapis.com/sfr-pcl-data-research/PCL_checkpoint/PCL_v2_epoch200.pth.tar"]
    assert fetched[0] in readme
    assert os.path.isfile(tmp_path / "hub" / "hub" / "checkpoints" / "PCL_v2_epoch200.pth.tar")
    reference = load_backbone(official_v2)
    assert model.arch == "resnet50" and same_features(model, reference, 32) and same_features(again, reference, 32)


def test_official_entries_read_a_local_copy_and_build_a_random_init_without_weights(official_v2, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download"))
    local = torch.hub.load(ROOT, "pcl_v1_resnet50", source="local", checkpoint=official_v2)
    assert same_features(local, load_backbone(official_v2), 32)
    random = torch.hub.load(ROOT, "pcl_v2_resnet50", source="local", pretrained=False)
    assert random.arch == "resnet50" and not same_features(random, local, 32)


def test_export_of_a_backbone_torchvision_cannot_build_says_so_and_load_backbone_reads_it(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    from pcl import PCLError
    from pcl.export import export

    out = tmp_path / "small.pth"
    proc = subprocess.run([sys.executable, "-m", "pcl.export", tiny_checkpoint, str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "not a torchvision state_dict" in proc.stdout and "width 4 with the small stem" in proc.stdout
    assert "load_backbone" in proc.stdout
    assert same_features(load_backbone(str(out)), load_backbone(tiny_checkpoint))
    assert same_features(torch.hub.load(ROOT, "backbone", source="local", checkpoint=str(out)),
                         load_backbone(tiny_checkpoint))
    with pytest.raises(PCLError, match="detectron2's ResNet configs build width 64 with the standard stem only"):
        export(tiny_checkpoint, str(tmp_path / "small.pkl"), "detectron2")


def test_export_of_a_torchvision_backbone_names_the_fc_step(tmp_path):
    import subprocess
    import sys

    official_checkpoint(tmp_path / "r18.pth.tar", arch="resnet18")
    proc = subprocess.run([sys.executable, "-m", "pcl.export", str(tmp_path / "r18.pth.tar"), str(tmp_path / "o.pth")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and "a torchvision state_dict without fc: give the model fc = nn.Identity()" in proc.stdout
