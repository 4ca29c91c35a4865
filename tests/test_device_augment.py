"""--augment device: the workers' uint8 crop is the official one, each device colour op is torchvision's, the jitter
order is a per-sample random permutation, the loader wrappers are seeded and resumable, --augment pil is unchanged."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import image_folder, tiny_args
from pcl.data import (DeviceAugmentLoader, DeviceEvalLoader, FileLoader, TensorAugment, build_pretrain_data,
                      eval_crop_transform, eval_transform, pretrain_crop_transform, pretrain_transform)
from pcl.data import data_settings, tensor_augment as ta

TOL = 2 / 255  # the brief's bound; float ops vs torchvision's uint8 ones (which truncate after each op)


def _picture(h: int = 60, w: int = 80, seed: int = 0) -> Image.Image:
    """A smooth RGB picture with a flat grey band (hue undefined there) and noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    x = torch.stack([xx, yy, 1 - xx * yy]) * 200 + torch.rand(3, h, w, generator=g) * 55
    x[:, : h // 6] = 120
    return Image.fromarray(x.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def _crops(n: int = 4, size: int = 32) -> torch.Tensor:
    """uint8 n x 3 x size x size: the worker transform's crops of one picture."""
    torch.manual_seed(0)
    crop = pretrain_crop_transform(size)
    return torch.stack([crop(_picture(seed=i)) for i in range(n)])


OPS = [("brightness", ta.adjust_brightness, TF.adjust_brightness, (0.6, 0.9, 1.4)),
       ("contrast", ta.adjust_contrast, TF.adjust_contrast, (0.6, 1.1, 1.4)),
       ("saturation", ta.adjust_saturation, TF.adjust_saturation, (0.6, 0.8, 1.4)),
       ("hue", ta.adjust_hue, TF.adjust_hue, (-0.4, -0.1, 0.05, 0.1, 0.4))]


@pytest.mark.parametrize("name,ours,theirs,values", OPS, ids=[o[0] for o in OPS])
def test_colour_op_matches_torchvision(name, ours, theirs, values):
    x8 = _crops()
    for v in values:
        got = ours(x8.float() / 255, torch.full((x8.shape[0],), v))
        want = torch.stack([theirs(img, v) for img in x8]).float() / 255
        assert (got - want).abs().max() <= TOL, (name, v)
        want_float = torch.stack([theirs(img.float() / 255, v) for img in x8])  # torchvision on float: exact
        assert (got - want_float).abs().max() <= 1e-4, (name, v)


def test_grayscale_and_blur_match_torchvision():
    x8 = _crops()
    x = x8.float() / 255
    assert (ta.rgb_to_grayscale(x).expand_as(x) - TF.rgb_to_grayscale(x8, 3).float() / 255).abs().max() <= TOL
    for sigma in (0.1, 0.7, 2.0):
        got = ta.gaussian_blur(x, torch.full((x.shape[0],), sigma))
        want = TF.gaussian_blur(x8, [ta.BLUR_KERNEL] * 2, [sigma] * 2).float() / 255
        assert (got - want).abs().max() <= TOL, sigma
    sigmas = torch.tensor([0.1, 0.5, 1.3, 2.0])  # per-sample sigma in one call
    got = ta.gaussian_blur(x, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        assert (got[i] - TF.gaussian_blur(x8[i], [ta.BLUR_KERNEL] * 2, [s] * 2).float() / 255).abs().max() <= TOL


def test_jitter_order_is_a_uniform_permutation_and_ranges_match():
    gen = torch.Generator().manual_seed(0)
    n = 24_000
    order, factors = ta.jitter_params(n, (0.4, 0.4, 0.4, 0.1), gen)
    assert (order.sort(1).values == torch.arange(4)).all()  # every row a permutation
    counts = collections.Counter(map(tuple, order.tolist()))
    assert set(counts) == set(itertools.permutations(range(4)))
    assert max(abs(c - n / 24) for c in counts.values()) < 0.15 * n / 24  # ~1000 each, sd ~31
    lo, hi = factors.min(0).values, factors.max(0).values
    assert torch.allclose(lo, torch.tensor([0.6, 0.6, 0.6, -0.1]), atol=1e-3)
    assert torch.allclose(hi, torch.tensor([1.4, 1.4, 1.4, 0.1]), atol=1e-3)
    _, v1 = ta.jitter_params(n, (0.4, 0.4, 0.4, 0.4), gen)
    assert abs(float(v1[:, 3].min()) + 0.4) < 1e-3 and abs(float(v1[:, 3].max()) - 0.4) < 1e-3


def test_color_jitter_applies_the_ops_in_each_samples_order():
    x8 = _crops()
    x = x8.float() / 255
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    factors = torch.tensor([[0.7, 1.3, 0.6, 0.08], [1.2, 0.8, 1.4, -0.1], [0.9, 0.6, 1.1, 0.05],
                            [1.4, 1.2, 0.7, -0.03]])
    got = ta.color_jitter(x, order, factors)
    tv = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(4):
        want = x[i]
        for op in order[i].tolist():
            want = tv[op](want, float(factors[i, op]))
        assert (got[i] - want).abs().max() <= 1e-4, i


def test_augment_draws_torchvisions_parameters(monkeypatch):
    seen = []
    real = ta.jitter_params
    monkeypatch.setattr(ta, "jitter_params", lambda b, strength, gen: seen.append(strength) or real(b, strength, gen))
    x8, gen = _crops(), torch.Generator().manual_seed(0)
    for aug_plus in (True, False):
        out = TensorAugment(32, aug_plus, mode="torchvision")(x8, gen)
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert seen == [(0.4, 0.4, 0.4, 0.1), (0.4, 0.4, 0.4, 0.4)]
    plain = TensorAugment(32, True, color=False, mode="torchvision")
    assert torch.equal(plain(x8, gen), plain.normalise(x8))
    with pytest.raises(ValueError):
        TensorAugment(32, True, mode="kornia")


def test_worker_crop_is_the_official_crop_and_flip():
    img = _picture(75, 100)
    official = [t for t in pretrain_transform(True, 24).transforms
                if isinstance(t, (T.RandomResizedCrop, T.RandomHorizontalFlip))]  # the official list's own ops
    assert len(official) == 2
    reference, worker = T.Compose([*official, T.PILToTensor()]), pretrain_crop_transform(24)
    for seed in range(20):
        torch.manual_seed(seed)
        want = reference(img)
        torch.manual_seed(seed)
        got = worker(img)
        assert got.dtype == torch.uint8 and got.shape == (3, 24, 24)
        assert torch.equal(got, want)
    aug = TensorAugment(24, True, mode="torchvision")
    assert torch.allclose(aug.normalise(eval_crop_transform(24)(img)[None])[0], eval_transform(24)(img), atol=1e-6)


def _device_data(tmp_path, *extra, device=torch.device("cpu")):
    root = image_folder(tmp_path / "data", ["a", "b"], per_class=4, size=20)
    args = tiny_args(tmp_path / "exp", "--dataset", "imagefolder", root, "--image-size", "16", "-b", "4",
                     "--workers", "1", "--seed", "3", *extra)
    return build_pretrain_data(data_settings(args), device=device)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_device_loader_is_seeded_and_resumable(tmp_path):
    data = _device_data(tmp_path, "--aug-plus", "--augment", "device")
    train, centre = data.train_loader, data.eval_loader
    assert isinstance(train, DeviceAugmentLoader) and isinstance(centre, DeviceEvalLoader)
    assert len(train) == 2
    a, b, c = _epoch(train, 0), _epoch(train, 0), _epoch(train, 1)
    for x, y in zip(a, b):
        assert all(torch.equal(s, t) for s, t in zip(x, y))
    im_q, im_k, index = a[0]
    assert im_q.shape == im_k.shape == (4, 3, 16, 16) and im_q.dtype == torch.float32 and index.shape == (4,)
    assert not torch.equal(im_q, im_k) and not torch.equal(a[0][0], c[0][0])

    train.set_epoch(0)  # mid-epoch: the sample order and the device stream continue after batch 1 exactly (the
    it = iter(train)  # workers' crops are not replayed, as with FileLoader)
    next(it)
    state = train.state_dict()
    train.set_epoch(0)
    train.load_state_dict(state)
    assert torch.equal(train.generator.get_state(), state["device_aug_gen"])
    rest = list(train)
    assert len(rest) == 1 and torch.equal(rest[0][2], a[1][2])

    feats = list(centre)
    images, index = feats[0]
    pil = build_pretrain_data(data_settings(tiny_args(tmp_path / "exp", "--dataset", "imagefolder", str(tmp_path / "data"),
                                        "--image-size", "16", "--workers", "0"))).eval_loader
    want, want_index = next(iter(pil))
    assert torch.equal(index, want_index) and torch.allclose(images, want, atol=1e-6)
    from pcl.gallery import display_images
    assert torch.equal(display_images(centre, [0, 3]), display_images(pil, [0, 3]))


def test_augment_pil_is_unchanged(tmp_path):
    data = _device_data(tmp_path)  # default --augment pil, with a device passed: the official PIL path
    assert tiny_args(tmp_path / "x").augment == "pil"
    assert type(data.train_loader) is FileLoader and type(data.eval_loader) is FileLoader
    transform = data.train_loader.loader.dataset.transform
    assert isinstance(transform.transforms[-1], T.Normalize)  # the official list, float output
    torch.manual_seed(0)
    first = _epoch(data.train_loader, 0)
    torch.manual_seed(0)
    again = _epoch(_device_data(tmp_path, device=None).train_loader, 0)
    assert all(torch.equal(s, t) for x, y in zip(first, again) for s, t in zip(x, y))
    fallback = _device_data(tmp_path, "--augment", "device", device=None)  # no device: PIL path, warned
    assert type(fallback.train_loader) is FileLoader


def test_tiny_pretraining_with_device_augmentation(tmp_path, monkeypatch):
    """fit end to end (E-step, M-step, gallery, checkpoint) with the loaders build_pretrain_data gives for the
    run's device (here the CPU)."""
    import pcl.engine as engine

    built = []
    real = engine.build_pretrain_data
    monkeypatch.setattr(engine, "build_pretrain_data", lambda cfg, **k: built.append(real(cfg, **k)) or built[-1])
    root = image_folder(tmp_path / "data", ["a", "b", "c"], per_class=4, size=20)
    args = tiny_args(tmp_path / "exp", "--dataset", "imagefolder", root, "--image-size", "16", "-b", "4",
                     "--num-cluster", "2,3", "--epochs", "2", "--warmup-epoch", "1", "--pcl-r", "8", "--aug-plus",
                     "--augment", "device", "--seed", "0", "--bn-splits", "2")
    stats = engine.fit(args)
    assert isinstance(built[0].train_loader, DeviceAugmentLoader) and isinstance(built[0].eval_loader, DeviceEvalLoader)
    assert stats["epoch"] == 1 and "loss_proto" in stats and torch.isfinite(torch.tensor(float(stats["loss_proto"])))
