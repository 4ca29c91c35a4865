"""Prototype galleries (pure functions, TensorBoard at each E-step) and the visualize command's PNGs and errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import image_folder, tiny_args
from pcl.launch import run_cli
from pcl.engine import fit
from pcl.evaluation import visualize
from pcl.gallery import choose_prototypes, display_images, gallery_rows, nearest_members, render_gallery


def test_nearest_members_are_the_closest_of_the_cluster_only():
    centroid = torch.tensor([1.0, 0.0])
    # members of cluster 3 at distances 0.5, 0.1, 0.3, 0.2 from the centroid; a non-member sits on the centroid
    feats = torch.tensor([[1.5, 0.0], [1.0, 0.1], [1.0, 0.0], [0.7, 0.0], [1.0, -0.2]])
    assign = torch.tensor([3, 3, 1, 3, 3])
    assert nearest_members(feats, assign, centroid, 3, 3) == [1, 4, 3]
    assert nearest_members(feats, assign, centroid, 3, 10) == [1, 4, 3, 0]  # fewer members than asked: all


def test_choose_prototypes_seeded_with_largest_and_smallest_and_no_empty():
    sizes = torch.tensor([5, 0, 9, 1, 4, 4, 7, 2, 0, 3])
    rows = choose_prototypes(sizes, num_random=4, seed=1)
    ids = [c for c, _ in rows]
    assert rows[-2:] == [(2, "largest"), (3, "smallest")]
    assert len(ids) == len(set(ids)) == 6 and 1 not in ids and 8 not in ids
    assert rows == choose_prototypes(sizes, num_random=4, seed=1)
    assert len(choose_prototypes(sizes, num_random=100, seed=0)) == 8  # every non-empty cluster once


def test_gallery_rows_carry_size_phi_and_members():
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(60, 4, generator=gen), dim=1)
    assign = torch.arange(60) % 6
    cents = F.normalize(torch.stack([feats[assign == c].mean(0) for c in range(6)]), dim=1)
    phi = torch.linspace(0.1, 0.6, 6)
    rows = gallery_rows(feats, assign, cents, phi, num_random=2, columns=3)
    for row in rows:
        assert row.size == 10 and row.phi == pytest.approx(float(phi[row.cluster]))
        assert row.members == nearest_members(feats, assign, cents[row.cluster], row.cluster, 3)
        assert all(int(assign[m]) == row.cluster for m in row.members)


def test_render_gallery_shape_and_pixels():
    images = (torch.arange(4 * 3 * 8 * 8) % 256).to(torch.uint8).view(4, 3, 8, 8)

    from types import SimpleNamespace

    loader = SimpleNamespace(images=images)  # an in-memory loader: .images
    pics = display_images(loader, [2, 0], size=8)
    assert torch.equal(pics[0], images[2]) and torch.equal(pics[1], images[0])
    rows = gallery_rows(torch.eye(4), torch.tensor([0, 0, 1, 1]), torch.eye(4)[:2], torch.tensor([0.2, 0.3]),
                        num_random=0, columns=2)
    img = render_gallery(rows, loader, columns=2, size=8)
    assert img.dtype == torch.uint8 and img.shape[0] == 3 and img.shape[1] == 2 * (8 + 2) + 2


def _events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_pretraining_logs_one_gallery_per_granularity_to_tensorboard(tmp_path, tiny_run):
    acc = _events(str(tiny_run / "tb"))  # fit(tiny_args(on)): 2 epochs, the one E-step in epoch 1
    assert set(acc.Tags()["images"]) == {"prototypes/k10", "prototypes/k20"}
    assert [i.step for i in acc.Images("prototypes/k20")] == [1]  # one gallery per E-step, at its epoch
    [image] = acc.Images("prototypes/k10")
    assert image.step == 1 and image.encoded_image_string[:4] == b"\x89PNG"
    assert (image.height, image.width) == (10 * 66 + 2, 120 + 8 * 66 + 2)  # 8 drawn + largest + smallest, 8 columns
    assert "prototypes/k10/text_summary" in acc.Tags()["tensors"]
    fit(tiny_args(tmp_path / "off", "--epochs", "1", "--warmup-epoch", "0", "--no-prototype-gallery"))
    assert _events(str(tmp_path / "off" / "tb")).Tags()["images"] == []


DEMO = ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "--workers", "0", "-b", "64"]


def test_visualize_writes_gallery_tsne_and_retrieval_pngs(tiny_checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "vis"
    code = run_cli(visualize.build_parser, visualize.run,
                   ["--pretrained", tiny_checkpoint, *DEMO, "--exp-dir", str(out), "--tsne-samples", "100",
                    "--queries", "3", "--columns", "4"])
    assert code == 0
    result = json.loads((out / "visualize.json").read_text())
    # the checkpoint's own E-step result (k = 10 and 20) drives the galleries
    assert set(result["files"]) == {"gallery_k10", "gallery_k20", "tsne", "retrieval"}
    for path in result["files"].values():
        assert open(path, "rb").read(4) == b"\x89PNG"
    assert set(result["retrieval_precision"]) == {"learned", "raw pixels"}


def test_visualize_without_labels_colours_by_cluster_and_random_compare(tmp_path, tiny_checkpoint):
    pytest.importorskip("matplotlib")
    root = image_folder(tmp_path / "data", ["only"], per_class=12, splits=("train",), size=16)
    out = tmp_path / "vis"
    code = run_cli(visualize.build_parser, visualize.run,
                   ["--pretrained", tiny_checkpoint, root, "--image-size", "16", "--workers", "0",
                    "--exp-dir", str(out), "--num-cluster", "3", "--queries", "2", "--columns", "3",
                    "--compare", "random"])
    assert code == 0
    result = json.loads((out / "visualize.json").read_text())
    assert result["labelled"] is False and "gallery_k3" in result["files"] and "retrieval_precision" not in result


@pytest.mark.parametrize("argv, message", [
    (["--tsne-samples", "5000"], "--tsne-samples 5000 is larger than the 718"),
    (["--queries", "0"], "--queries 0: must be >= 1"),
    (["--only", "pictures"], "--only 'pictures': choose from"),
    (["--columns", "5000"], "--columns 5000: there are only 1438 training images to retrieve per query"),  # NZ07
    (["--num-cluster", "5000"], "--num-cluster 5000: k=5000 is larger than the 1438 training images"),  # WV01
])
def test_visualize_bad_settings_are_one_line_errors(tiny_checkpoint, tmp_path, capsys, argv, message):
    code = run_cli(visualize.build_parser, visualize.run,
                   ["--pretrained", tiny_checkpoint, *DEMO, "--exp-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_an_explicit_num_cluster_replaces_the_checkpoints_saved_galleries(tiny_checkpoint):
    """WV01: --num-cluster 7 drew the checkpoint's k = 10, 20 galleries without a word."""
    from types import SimpleNamespace

    from pcl.settings import RunConfig

    feats = F.normalize(torch.randn(1438, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    train = SimpleNamespace(labels=torch.arange(1438) % 10)
    args = RunConfig(pretrained=tiny_checkpoint, num_cluster="7", gallery_rows=2, columns=2, seed=0)
    assert set(visualize.galleries(feats, train, args, True)) == {7}
    assert set(visualize.galleries(feats, train, args.replace(num_cluster="10,20"), True)) == {10, 20}


def test_visualize_checkpoint_without_backbone_fails_before_reading_data(tmp_path, capsys):
    path = tmp_path / "head_only.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, path)
    code = run_cli(visualize.build_parser, visualize.run,
                   ["--pretrained", str(path), "-a", "resnet18", "/nonexistent", "--exp-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds no backbone weights" in err and len(err.splitlines()) == 1


def test_tsne_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(Exception, match=r"pip install -e \"\.\[plots\]\""):
        visualize.tsne_figure(torch.randn(10, 4), None, torch.zeros(10, dtype=torch.long), str(tmp_path / "t.png"),
                              0, "t")
