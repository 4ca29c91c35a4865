"""The batched augmentation (in-memory sets and --augment device): the crop is the official one (the workers' PIL crop,
or the batched crop bit-exact with it), each colour op is torchvision's, the blur is PIL's bit for bit, the jitter
order is a per-sample random permutation, no host constant per call, the loader wrappers are seeded and resumable,
--augment pil is unchanged."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

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


def test_grayscale_matches_torchvision():
    x8 = _crops()
    x = x8.float() / 255
    assert (ta.rgb_to_grayscale(x).expand_as(x) - TF.rgb_to_grayscale(x8, 3).float() / 255).abs().max() <= TOL


def _pil_blur(x8: torch.Tensor, sigma: float) -> torch.Tensor:
    """The official blur (transforms.GaussianBlur's filter) on a uint8 3 x H x W tensor."""
    img = Image.fromarray(x8.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius=sigma))
    return TF.pil_to_tensor(img)


def test_blur_is_pils_gaussian_blur_bit_for_bit():
    """The batched blur equals PIL's ImageFilter.GaussianBlur on uint8 images: per-sample sigma over MoCo v2's
    [0.1, 2] (and beyond, up to the clip), images narrower than the box, borders extended as PIL does."""
    gen = torch.Generator().manual_seed(0)
    for h, w in [(32, 32), (7, 40), (1, 5), (3, 3), (23, 17)]:
        x8 = torch.randint(0, 256, (12, 3, h, w), dtype=torch.uint8, generator=gen)
        sigma = torch.empty(12).uniform_(0.1, 2.0, generator=gen)
        sigma[:3] = torch.tensor([0.1, 0.3, 2.0])
        got = (ta.gaussian_blur(x8.float() / 255, sigma) * 255).round().to(torch.uint8)
        for i in range(12):
            assert torch.equal(got[i], _pil_blur(x8[i], float(sigma[i]))), (h, w, float(sigma[i]))
    x8 = torch.randint(0, 256, (2, 3, 9, 9), dtype=torch.uint8, generator=gen)
    wide = (ta.gaussian_blur(x8.float() / 255, torch.tensor([7.5, 30.0]), max_sigma=30.0) * 255).round()
    assert torch.equal(wide[1].to(torch.uint8), _pil_blur(x8[1], 30.0))


def test_blur_has_pils_effective_sigma_on_an_impulse():
    """The spread of an impulse's response follows PIL's over [0.1, 2] (the earlier sampled 13-tap Gaussian gave
    0.09 instead of 0.30 at sigma 0.3)."""
    def spread(image: torch.Tensor) -> float:
        row = image.double().sum(0)  # the response's profile along x
        t = torch.arange(row.numel(), dtype=torch.float64)
        mean = (row * t).sum() / row.sum()
        return float(((row * (t - mean) ** 2).sum() / row.sum()).sqrt())
    impulse = torch.zeros(1, 3, 41, 41, dtype=torch.uint8)
    impulse[..., 20, 20] = 255
    for sigma in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0):
        ours = ta.gaussian_blur(impulse.float() / 255, torch.tensor([sigma]))[0, 0] * 255
        pil = _pil_blur(impulse[0], sigma)[0].double()
        assert abs(spread(ours) - spread(pil)) < 1e-9, sigma
        if sigma >= 0.3:
            assert abs(spread(pil) - sigma) < 0.2 * sigma  # PIL's box passes follow sigma itself


def test_in_memory_crop_is_torchvisions_random_resized_crop_on_pil():
    """crop=True: each box is resized exactly as TF.resized_crop resizes a PIL image (Pillow's bilinear), then
    flipped; upscaled and downscaled boxes, non-square images."""
    gen = torch.Generator().manual_seed(1)
    for h, w, size in [(32, 32, 32), (28, 28, 28), (40, 25, 16), (17, 45, 24), (9, 9, 30)]:
        x8 = torch.randint(0, 256, (16, 3, h, w), dtype=torch.uint8, generator=gen)
        boxes = ta.crop_boxes(16, h, w, (0.08, 1.0), gen)
        flip = torch.rand(16, generator=gen) < 0.5
        got = ta.random_resized_crop(x8, boxes, size, flip)
        for i in range(16):
            top, left, bh, bw = boxes[i].tolist()
            want = TF.resized_crop(Image.fromarray(x8[i].permute(1, 2, 0).numpy()), top, left, bh, bw, [size, size])
            want = TF.pil_to_tensor(TF.hflip(want) if flip[i] else want)
            assert torch.equal(got[i], want), (h, w, size, boxes[i].tolist())


def test_crop_boxes_follow_torchvisions_distribution():
    """Area, aspect ratio and position of the batched boxes against RandomResizedCrop.get_params' own draws, and its
    centre-crop fallback on an image no box fits (every try's rounded box too wide)."""
    gen, n = torch.Generator().manual_seed(2), 20_000
    ours = ta.crop_boxes(n, 30, 40, (0.2, 1.0), gen).double()
    torch.manual_seed(2)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, 30, 40), [0.2, 1.0], [3 / 4, 4 / 3])
                           for _ in range(n)], dtype=torch.float64)
    for stat in (lambda b: b[:, 2] * b[:, 3] / 1200, lambda b: (b[:, 3] / b[:, 2]).log(), lambda b: b[:, 0],
                 lambda b: b[:, 1] + b[:, 3] / 2):
        a, b = stat(ours), stat(theirs)
        assert abs(float(a.mean() - b.mean())) < 4 * float(b.std()) / n ** 0.5 * 1.5
        assert abs(float(a.std() - b.std())) < 0.03 * float(b.std())
    thin = ta.crop_boxes(8, 100, 1, (0.5, 1.0), gen)  # 100 x 1: only the fallback fits (ratio clamped to 3/4)
    assert thin.tolist() == [[49, 0, 1, 1]] * 8 == [list(T.RandomResizedCrop.get_params(
        torch.empty(3, 100, 1), [0.5, 1.0], [3 / 4, 4 / 3]))] * 8


def test_augment_builds_no_host_constant_after_its_first_call():
    """No tensor from host data per call once the constants are on the device (on a GPU each would be a blocking
    host-to-device copy per step): recorded as the dispatcher's lift_fresh / device copies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.host = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
                self.host.append(str(func))
            return func(*args, **(kwargs or {}))

    x8 = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for augment in (TensorAugment(16, True), TensorAugment(16, False), TensorAugment(20, True, crop=False),
                    TensorAugment(16, False, hue="yiq")):
        gen = torch.Generator().manual_seed(0)
        augment(x8, gen)  # the first call builds the constants
        with Recorder() as rec:
            augment(x8, gen)
            augment.normalise(x8)
        assert rec.host == [], (augment.aug_plus, augment.crop, rec.host)


def test_jitter_order_is_a_uniform_permutation_and_ranges_match():
    gen = torch.Generator().manual_seed(0)
    n = 24_000
    order, factors = ta.jitter_params(n, ta.jitter_bounds(ta.JITTER_V2, "cpu"), gen)
    assert (order.sort(1).values == torch.arange(4)).all()  # every row a permutation
    counts = collections.Counter(map(tuple, order.tolist()))
    assert set(counts) == set(itertools.permutations(range(4)))
    assert max(abs(c - n / 24) for c in counts.values()) < 0.15 * n / 24  # ~1000 each, sd ~31
    lo, hi = factors.min(0).values, factors.max(0).values
    assert torch.allclose(lo, torch.tensor([0.6, 0.6, 0.6, -0.1]), atol=1e-3)
    assert torch.allclose(hi, torch.tensor([1.4, 1.4, 1.4, 0.1]), atol=1e-3)
    _, v1 = ta.jitter_params(n, ta.jitter_bounds(ta.JITTER_V1, "cpu"), gen)
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
    monkeypatch.setattr(ta, "jitter_params", lambda b, bounds, gen: seen.append(bounds.tolist()) or real(b, bounds, gen))
    x8, gen = _crops(), torch.Generator().manual_seed(0)
    for aug_plus in (True, False):
        out = TensorAugment(32, aug_plus, crop=False)(x8, gen)
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    v2, v1 = ([[0.6, 0.6, 0.6, -s], [1.4, 1.4, 1.4, s]] for s in (0.1, 0.4))
    assert torch.allclose(torch.tensor(seen), torch.tensor([v2, v1]))
    plain = TensorAugment(32, True, color=False, crop=False)
    assert torch.equal(plain(x8, gen), plain.normalise(x8))


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
    aug = TensorAugment(24, True, crop=False)
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


def _hue_yiq_float64(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Reference: per sample, RGB -> YIQ, the (I, Q) plane turned by factor x 2 pi, back, clipped (float64)."""
    m = torch.tensor(ta.RGB_TO_YIQ, dtype=torch.float64)
    out = []
    for img, f in zip(x.double(), factor.double()):
        a = float(f) * 2 * torch.pi
        rot = torch.tensor([[1, 0, 0], [0, torch.cos(torch.tensor(a)), -torch.sin(torch.tensor(a))],
                            [0, torch.sin(torch.tensor(a)), torch.cos(torch.tensor(a))]], dtype=torch.float64)
        out.append(torch.einsum("ij,jhw->ihw", torch.linalg.inv(m) @ rot @ m, img).clamp(0, 1))
    return torch.stack(out)


def test_yiq_hue_matches_its_float64_reference_and_keeps_luma():
    """--hue-space yiq: the chroma plane turned, luma (Y) unchanged wherever the result needs no clipping."""
    x = _crops().float() / 255
    yiq = torch.tensor(ta.RGB_TO_YIQ)
    rgb = torch.linalg.inv(torch.tensor(ta.RGB_TO_YIQ, dtype=torch.float64)).float()
    factor = torch.tensor([-0.4, -0.1, 0.25, 0.4])
    got = ta.adjust_hue_yiq(x, factor, yiq, rgb)
    assert (got.double() - _hue_yiq_float64(x, factor)).abs().max() < 1e-5
    luma_in, luma_out = torch.einsum("j,bjhw->bhw", yiq[0], x), torch.einsum("j,bjhw->bhw", yiq[0], got)
    kept = ((got > 0) & (got < 1)).all(1)  # pixels the clip did not touch
    assert kept.float().mean() > 0.5 and (luma_in - luma_out)[kept].abs().max() < 1e-5
    hsv = ta.adjust_hue(x, factor)  # torchvision's hue moves luma by much more
    assert (luma_in - torch.einsum("j,bjhw->bhw", yiq[0], hsv)).abs().max() > 0.05
    assert torch.allclose(ta.adjust_hue_yiq(x, torch.zeros(4), yiq, rgb), x, atol=1e-6)  # angle 0: identity


def test_hue_space_changes_only_the_hue_op():
    """TensorAugment(hue="yiq") draws the same parameters as "hsv": with hue factors of 0 both give the same views."""
    x8 = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = TensorAugment(16, False), TensorAugment(16, False, hue="yiq")
    for aug in (a, b):
        aug.constants(torch.device("cpu"))["jitter"][:, 3] = 0.0  # hue factor always 0
    va, vb = a(x8, torch.Generator().manual_seed(3)), b(x8, torch.Generator().manual_seed(3))
    assert torch.allclose(va, vb, atol=1e-5)
    a, b = TensorAugment(16, False), TensorAugment(16, False, hue="yiq")  # the v1 hue range, +-0.4: they differ
    va, vb = a(x8, torch.Generator().manual_seed(3)), b(x8, torch.Generator().manual_seed(3))
    assert ((va - vb).abs().amax(dim=(1, 2, 3)) > 0.05).sum() >= 3  # all but the grey ones (RandomGrayscale first)
    with pytest.raises(ValueError, match="hue space 'lab'"):
        TensorAugment(16, False, hue="lab")


def test_hue_space_flag_reaches_the_in_memory_augmentation_and_warns_on_the_pil_path(tmp_path, pcl_warnings,
                                                                                     monkeypatch):
    args = tiny_args(tmp_path / "a", "--hue-space", "yiq")
    data = build_pretrain_data(data_settings(args))
    calls = []
    monkeypatch.setattr(ta, "adjust_hue_yiq", lambda *a: calls.append(1) or a[0])
    next(iter(data.train_loader))
    assert data.train_loader.augment.hue == "yiq" and len(calls) >= 1  # both views go through the YIQ turn
    assert build_pretrain_data(data_settings(tiny_args(tmp_path / "b"))).train_loader.augment.hue == "hsv"
    assert pcl_warnings == []
    folder = image_folder(tmp_path / "imgs", ["a", "b"], per_class=2, size=40)
    args = tiny_args(tmp_path / "c", "--dataset", "imagefolder", str(folder), "--hue-space", "yiq", "-j", "0")
    build_pretrain_data(data_settings(args))
    assert len(pcl_warnings) == 1 and pcl_warnings[0].startswith("--hue-space yiq: no effect here")
