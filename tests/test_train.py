import os

import pytest
import torch

from conftest import official_checkpoint, tiny_args, tiny_argv
from pcl import PCLError
from pcl.checkpoint import load_backbone, load_checkpoint, query_backbone
from pcl.engine import fit


def _weights(path):
    return load_checkpoint(path)["state_dict"]


def test_two_epoch_run_with_e_step_writes_official_checkpoint(tmp_path):
    args = tiny_args(tmp_path, "--save-freq", "1")
    stats = fit(args)
    assert "loss_proto" in stats and "acc_proto" in stats and stats["epoch"] == 1
    assert 0.0 <= stats["nmi_k10"] <= 100.0 and "ami_k20" in stats  # clustering quality per E-step (labelled set)
    ckpt = load_checkpoint(os.path.join(tmp_path, "checkpoint_0001.pth.tar"))
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet18"
    keys = ckpt["state_dict"].keys()
    assert {"module.queue", "module.queue_ptr", "module.encoder_q.conv1.weight", "module.encoder_k.fc.2.weight"} <= set(keys)
    assert "state" in ckpt["optimizer"] and len(ckpt["cluster_result"]["im2cluster"]) == 2
    assert os.path.exists(os.path.join(tmp_path, "checkpoint_0000.pth.tar"))
    assert os.path.exists(os.path.join(tmp_path, "checkpoint_last.pth.tar"))
    lines = open(os.path.join(tmp_path, "log.txt")).read().splitlines()
    assert len(lines) == 2


def test_resume_equals_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    fit(tiny_args(full, "--epochs", "4", "--warmup-epoch", "2", "--save-freq", "2"))
    os.makedirs(part)
    fit(tiny_args(part, "--epochs", "4", "--warmup-epoch", "2", "--save-freq", "2",
                  "--resume", str(full / "checkpoint_0001.pth.tar")))
    a, b = _weights(full / "checkpoint_0003.pth.tar"), _weights(part / "checkpoint_0003.pth.tar")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_load_backbone_from_our_checkpoint(tiny_run_1ep):
    backbone = load_backbone(str(tiny_run_1ep / "checkpoint_0000.pth.tar"))
    assert not backbone.training
    out = backbone(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 32)  # resnet18 at width 4: 8 * 4 pooled features, no head


@pytest.mark.parametrize("mlp", [False, True])
def test_load_backbone_from_official_layout(tmp_path, mlp):
    path = str(tmp_path / "official.pth.tar")
    enc = official_checkpoint(path, mlp=mlp)
    backbone = load_backbone(path)
    enc.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(backbone(x), enc.eval()(x), atol=1e-6)


def test_load_backbone_wrong_arch_fails_clearly(tmp_path):
    path = str(tmp_path / "official.pth.tar")
    official_checkpoint(path)
    with pytest.raises(PCLError, match="does not fit architecture 'resnet50'"):
        load_backbone(path, arch="resnet50")


def test_query_backbone_matches_loaded_backbone(tmp_path, tiny_run_1ep):
    from pcl.engine import setup

    path = str(tiny_run_1ep / "checkpoint_0000.pth.tar")
    args = tiny_args(tmp_path, "--epochs", "1", "--resume", path)
    from pcl.config import validate_pretrain_args
    from pcl.resume import load_into

    args = validate_pretrain_args(args)
    device, _, model, opt = setup(args)
    load_into(path, model, opt, device)
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(query_backbone(model)(x), load_backbone(path)(x), atol=1e-6)


class Payload:
    """An arbitrary class: unpickling it would run this module's code."""


def test_pickled_object_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "payload": Payload()}, path)
    with pytest.raises(PCLError, match="refusing to load"):
        load_checkpoint(str(path))


def test_truncated_checkpoint_is_unreadable(tmp_path):
    good = tmp_path / "good.pth.tar"
    torch.save({"epoch": 1, "w": torch.randn(1000)}, good)
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(good.read_bytes()[:500])
    with pytest.raises(PCLError, match="unreadable or truncated"):
        load_checkpoint(str(bad))


def test_image_folder_pipeline_with_pil_augmentations(tmp_path):
    """The file path (ImageFolder, official PIL v2 augmentation with blur, DataLoader) through an E-step."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i in range(48):
        folder = tmp_path / "data" / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(24, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    args = tiny_args(tmp_path / "exp", "--dataset", "imagefolder", "--aug-plus", "-b", "16", "--pcl-r", "64",
                     "--num-cluster", "3,4", "--bn-splits", "2")
    stats = fit(args.replace(data=str(tmp_path / "data")))
    assert stats["epoch"] == 1 and "loss_proto" in stats


def test_missing_torchvision_dataset_names_the_fix(tmp_path):
    from pcl.config import validate_pretrain_args
    from pcl.data import build_pretrain_data, data_settings

    args = validate_pretrain_args(tiny_args(tmp_path / "exp", "--dataset", "cifar10"))
    with pytest.raises(PCLError, match="cifar10 not found .* --download"):
        build_pretrain_data(data_settings(args.replace(data=str(tmp_path))))


def test_speed_options_keep_the_checkpoint_layout(tmp_path):
    """--channels-last and the fused SGD kernel: training completes and saves the official keys (own process,
    with a deadline, so that a kernel hang fails the test instead of stalling the suite)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = tiny_argv(tmp_path, "--channels-last", "--sgd-impl", "fused")
    proc = subprocess.run([sys.executable, os.path.join(root, "main_pcl.py"), *argv], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(os.path.join(tmp_path, "checkpoint_0001.pth.tar"))
    keys = ckpt["state_dict"].keys()
    assert "module.encoder_q.conv1.weight" in keys and not any("_orig_mod" in k for k in keys)
    assert ckpt["state_dict"]["module.encoder_q.conv1.weight"].is_contiguous()  # saved in the default layout
    assert len(ckpt["cluster_result"]["im2cluster"]) == 2
    # on the CPU --channels-last is refused with the reason: at width 4 the NHWC 1x1 stride-2 weight-gradient
    # kernel of oneDNN (AVX2) hangs -- this very run used to stall forever
    assert "--channels-last is ignored on the CPU" in proc.stdout + proc.stderr


@pytest.mark.parametrize("content, message", [
    (bytes(range(7, 71)) * 4, "is not a PyTorch checkpoint: it starts with bytes"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "is not a PyTorch checkpoint: it is an HTML/XML page"),
    (b"\x1f\x8b\x08\x00" + b"\x00" * 40, "is not a PyTorch checkpoint: it is gzip-compressed"),
    (b"", "is not a PyTorch checkpoint: the file is empty"),
])
def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path, content, message):
    """Not 'an unsafe pickle that could run code': what the file is, and what to do."""
    path = tmp_path / "model.pth.tar"
    path.write_bytes(content)
    with pytest.raises(PCLError, match=message):
        load_checkpoint(str(path))


def test_a_directory_given_as_checkpoint_says_so(tmp_path):
    with pytest.raises(PCLError, match="is a directory: give a checkpoint file in it"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("content, message", [
    ({"epoch": 3, "arch": "resnet18", "state_dict": {"module.fc.weight": torch.zeros(10, 8)}, "best_acc1": 40.0,
      "num_classes": 10}, "this is a linear-probe checkpoint of eval_linear.py"),
    ({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, "this is a bare weights file"),
])
def test_resume_names_the_kind_of_file_it_was_given(tmp_path, content, message):
    path = tmp_path / "other.pth.tar"
    torch.save(content, path)
    with pytest.raises(PCLError, match=message):
        fit(tiny_args(tmp_path / "run", "--resume", str(path)))


def test_nan_weights_in_a_pretrained_file_are_named_as_the_cause(tmp_path, tiny_run_1ep):
    ckpt = load_checkpoint(tiny_run_1ep / "checkpoint_last.pth.tar")
    ckpt["state_dict"]["module.encoder_q.layer1.0.conv1.weight"].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pth.tar")
    with pytest.raises(PCLError, match=r"NaN/inf or diverged \(\|w\| >= 1e\+10\) backbone weights in 1 tensors "
                                       r"\(first: layer1.0.conv1.weight\)"):
        load_backbone(str(tmp_path / "nan.pth.tar"))
    ckpt["state_dict"]["module.encoder_q.layer1.0.conv1.weight"].fill_(1e28)  # NN11: finite, diverged
    torch.save(ckpt, tmp_path / "big.pth.tar")
    with pytest.raises(PCLError, match=r"big.pth.tar has NaN/inf or diverged .* the run that wrote it diverged"):
        load_backbone(str(tmp_path / "big.pth.tar"))


@pytest.mark.parametrize("value", [float("nan"), 1e28], ids=["NN10", "NN13"])
def test_resuming_diverged_weights_names_the_file_not_the_lr(tmp_path, tiny_run_1ep, value):
    ckpt = load_checkpoint(tiny_run_1ep / "checkpoint_last.pth.tar")
    ckpt["state_dict"]["module.encoder_q.layer1.0.conv1.weight"].fill_(value)
    torch.save(ckpt, tmp_path / "bad.pth.tar")
    with pytest.raises(PCLError, match=r"--resume .*bad.pth.tar holds diverged weights \(largest \|w\| = "
                                       r"(nan|1e\+28)\): the run that wrote it diverged; resume an earlier checkpoint"):
        fit(tiny_args(tmp_path / "run", "--resume", str(tmp_path / "bad.pth.tar")))


def test_hand_made_checkpoint_with_a_wrong_state_dict_type_is_named(tmp_path):
    path = tmp_path / "hand.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": [torch.zeros(2)]}, path)
    with pytest.raises(PCLError, match="its state_dict is a list of the wrong shape"):
        load_backbone(str(path))
