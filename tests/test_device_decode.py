"""--decode device (with --augment device): the workers' crop boxes and flips are the official ones, the crops
decoded on the device (here its CPU path) match the workers' PIL decode, grey and non-JPEG files come out RGB, a
seeded epoch repeats, the flag is refused without --augment device, and a tiny run trains."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision.datasets as tvd
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import tiny_args
from pcl import PCLError
from pcl.data import (DeviceAugmentLoader, data_settings, EncodedPairs, IndexedDataset, PretrainCropBoxes, SafeImages,
                      build_pretrain_data, collate_encoded, decode_crops, load_image, pretrain_crop_transform)

# Measured on these files (16 crops per size): the device path on the CPU decodes bit-exactly as PIL (both
# libjpeg-turbo) and resizes with torchvision's uint8 antialiased bilinear kernel, within one level of PIL's resize:
# mean |diff| 0.0024 (16 px), 0.0033 (24 px), 0.031 (64 px, upsampled) levels, max 1. (The float resize CUDA runs:
# mean 0.10-0.18, max 1; nvJPEG's own decode differences are not measurable here.) Bounds: 3x / 2x the worst seen.
MEAN_TOL, MAX_TOL = 0.1, 2  # in levels of 255


def _picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth RGB picture with stripes and noise (crop boxes show in the pixels)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    x = torch.stack([xx, yy, 1 - xx * yy]) * 180 + 40 * torch.sin(xx * 30 + seed)[None]
    x = x + torch.rand(3, h, w, generator=g) * 35
    return Image.fromarray(x.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def _jpeg_folder(root, n: int = 8, size: tuple[int, int] = (100, 75)) -> str:
    """root/train/<a|b>/<i>.jpg, quality-90 RGB JPEGs; returns root."""
    for i in range(n):
        folder = os.path.join(str(root), "train", "ab"[i % 2])
        os.makedirs(folder, exist_ok=True)
        _picture(*size, seed=i).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return str(root)


def _sets(root, size: int):
    """The same files as --decode cpu's worker dataset and --decode device's."""
    base = SafeImages(tvd.ImageFolder(os.path.join(root, "train"), loader=load_image))
    return (IndexedDataset(base, pretrain_crop_transform(size), two_crops=True),
            EncodedPairs(base, PretrainCropBoxes(size)))


def _official_draws(img: Image.Image, size: int, monkeypatch) -> list[tuple[int, int, int, int, bool]]:
    """The (top, left, height, width, flip) of two views as ``pretrain_crop_transform`` takes them, read off its
    calls to torchvision's resized_crop and hflip."""
    events: list = []
    real_crop, real_flip = TF.resized_crop, TF.hflip
    with monkeypatch.context() as m:
        m.setattr(TF, "resized_crop", lambda im, i, j, h, w, *a, **k: events.append([i, j, h, w, False])
                  or real_crop(im, i, j, h, w, *a, **k))
        m.setattr(TF, "hflip", lambda im: events[-1].__setitem__(4, True) or real_flip(im))
        transform = pretrain_crop_transform(size)
        transform(img), transform(img)
    return [tuple(e) for e in events]


def test_boxes_and_flips_are_the_official_ones(monkeypatch):
    boxes = PretrainCropBoxes(24)
    for w, h in [(100, 75), (75, 100), (500, 375), (30, 300), (24, 24)]:  # (30, 300): the central-crop fallback too
        img = _picture(w, h, seed=w)
        for seed in range(25):
            torch.manual_seed(seed)
            want = _official_draws(img, 24, monkeypatch)
            after = torch.get_rng_state()
            torch.manual_seed(seed)
            got = [boxes(w, h) for _ in range(2)]
            assert got == want, (w, h, seed)
            assert torch.equal(torch.get_rng_state(), after)  # the same number of draws: later ones line up
            torch.manual_seed(seed)
            official = pretrain_crop_transform(24)
            assert torch.equal(boxes.apply(img, got[0]), official(img))  # the workers' fallback crop is exact


def test_device_decoded_crops_match_the_worker_decode(tmp_path):
    root = _jpeg_folder(tmp_path)
    for size in (16, 24):
        cpu, dev = _sets(root, size)
        items, want = [], []
        for i in range(len(dev)):
            torch.manual_seed(i)
            want.append(cpu[i][:2])
            torch.manual_seed(i)
            items.append(dev[i])
        assert all(item[0].dim() == 1 for item in items)  # every file went as bytes
        payloads, boxes, index = collate_encoded(items)
        assert boxes.shape == (len(dev), 2, 5) and torch.equal(index, torch.arange(len(dev)))
        got = decode_crops(payloads, boxes, size, "cpu")  # uint8 2B x 3 x S x S: first views, then second ones
        assert got.dtype == torch.uint8 and got.shape == (2 * len(dev), 3, size, size)
        ref = torch.cat([torch.stack([w[0] for w in want]), torch.stack([w[1] for w in want])])
        diff = (got.float() - ref.float()).abs()
        assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL, (size, float(diff.mean()), float(diff.max()))


def test_grey_png_and_cmyk_files_come_out_rgb(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    rgb = _picture(60, 45, seed=1)
    rgb.convert("L").save(folder / "grey.jpg", quality=90)
    rgb.save(folder / "colour.png")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    cpu, dev = _sets(str(tmp_path), 16)
    names = [os.path.basename(p) for p, _ in dev.samples]
    items, want = [], []
    for i in range(len(dev)):
        torch.manual_seed(i)
        want.append(torch.stack(cpu[i][:2]))
        torch.manual_seed(i)
        items.append(dev[i])
    kinds = {n: item[0].dim() for n, item in zip(names, items)}
    assert kinds == {"grey.jpg": 1, "colour.png": 4, "grey.png": 4, "cmyk.jpg": 4}  # bytes, or cropped in the worker
    payloads, boxes, _ = collate_encoded(items)
    got = decode_crops(payloads, boxes, 16, "cpu").view(2, len(dev), 3, 16, 16).transpose(0, 1)  # B x 2 x 3 x S x S
    for name, crops, ref in zip(names, got, want):
        assert crops.shape == (2, 3, 16, 16)
        diff = (crops.float() - ref.float()).abs()
        if kinds[name] == 4:
            assert torch.equal(crops, ref), name  # decoded and cropped in the worker: --decode cpu's crop exactly
        else:
            assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL, (name, float(diff.mean()))
        if name.startswith("grey"):
            assert torch.equal(crops[:, 0], crops[:, 1]) and torch.equal(crops[:, 1], crops[:, 2]), name


def _device_data(tmp_path, *extra):
    root = _jpeg_folder(tmp_path / "data")
    args = tiny_args(tmp_path / "exp", "--dataset", "imagefolder", root, "--image-size", "16", "-b", "4",
                     "--workers", "1", "--seed", "3", "--aug-plus", "--augment", "device", *extra)
    return build_pretrain_data(data_settings(args), device=torch.device("cpu"))


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_seeded_epoch_repeats_and_matches_decode_cpu(tmp_path):
    train = _device_data(tmp_path, "--decode", "device").train_loader
    assert isinstance(train, DeviceAugmentLoader) and train.decode_size == 16
    assert isinstance(train.inner.loader.dataset, EncodedPairs) and len(train) == 2
    a, b, c = _epoch(train, 0), _epoch(train, 0), _epoch(train, 1)
    assert all(torch.equal(s, t) for x, y in zip(a, b) for s, t in zip(x, y))
    im_q, im_k, index = a[0]
    assert im_q.shape == im_k.shape == (4, 3, 16, 16) and im_q.dtype == torch.float32
    assert not torch.equal(im_q, im_k) and not torch.equal(a[0][0], c[0][0])
    cpu = _epoch(_device_data(tmp_path, "--decode", "cpu").train_loader, 0)  # same seed: same boxes, same draws
    for x, y in zip(a, cpu):
        assert torch.equal(x[2], y[2])
        diff = torch.cat([(x[0] - y[0]).abs(), (x[1] - y[1]).abs()])  # normalised units (1 level ~ 0.017)
        assert diff.mean() <= 0.002 and diff.max() <= 0.1, (float(diff.mean()), float(diff.max()))  # seen: 1e-4, 0.027


def _refusing(monkeypatch, refused: set[bytes], calls: list | None = None):
    """decode_jpeg as nvJPEG would be if it refused the files whose bytes are in ``refused`` (CMYK-like,
    12-bit, arithmetic coded, an unknown subsampling: files the CPU decoder takes): the batch fails, and so does
    that file alone."""
    import pcl.data.device_input as device_input
    from torchvision.io import decode_jpeg

    def decode(payload, **kwargs):
        items = payload if isinstance(payload, list) else [payload]
        if calls is not None:
            calls.append(len(items))
        if any(bytes(p.numpy()) in refused for p in items):
            raise RuntimeError("nvjpegDecodeBatchedPhaseOne failed")
        return decode_jpeg(payload, **kwargs)

    monkeypatch.setattr(device_input, "decode_jpeg", decode)


def test_a_file_the_device_decoder_refuses_is_decoded_on_the_host_with_its_boxes(tmp_path, monkeypatch):
    """The refused file's two crops are --decode cpu's exactly (PIL, the same boxes); the others still go through
    the device decoder; without a host fallback the file is named."""
    root = _jpeg_folder(tmp_path, n=6)
    cpu, dev = _sets(root, 16)
    refused = open(dev.samples[2][0], "rb").read()
    calls: list = []
    _refusing(monkeypatch, {refused}, calls)
    items, want = [], []
    for i in range(len(dev)):
        torch.manual_seed(i)
        want.append(torch.stack(cpu[i][:2]))
        torch.manual_seed(i)
        items.append(dev[i])
    payloads, boxes, index = collate_encoded(items)
    host = []
    got = decode_crops(payloads, boxes, 16, "cpu",
                       host=lambda b: host.append(b) or dev.host_crops(int(index[b]), boxes[b]))
    got = got.view(2, len(dev), 3, 16, 16).transpose(0, 1)  # B x 2 x 3 x S x S
    assert host == [2] and calls[0] == 6 and sum(calls[1:]) == 6  # the batch, then one by one
    assert torch.equal(got[2], want[2])  # decoded on the host: --decode cpu's crops exactly
    for i in (0, 1, 3, 4, 5):
        diff = (got[i].float() - want[i].float()).abs()
        assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL, i
    name = os.path.basename(dev.samples[2][0])
    with pytest.raises(PCLError, match=f"cannot decode .*{name} on cpu.*--decode cpu"):
        decode_crops(payloads, boxes, 16, "cpu", [p for p, _ in dev.samples])


def test_a_grey_image_from_the_decoder_is_rgb_and_a_wrong_size_goes_to_the_host(tmp_path, monkeypatch):
    import pcl.data.device_input as device_input

    root = _jpeg_folder(tmp_path, n=2)
    _, dev = _sets(root, 16)
    torch.manual_seed(0)
    items = [dev[0], dev[1]]
    payloads, boxes, index = collate_encoded(items)
    real = device_input.decode_jpeg

    def odd(payload, **kwargs):  # what a decoder might return: one channel for file 0, a smaller image for file 1
        out = [real(p, **kwargs) for p in payload]
        return [out[0][:1], out[1][:, :10, :10]]

    monkeypatch.setattr(device_input, "decode_jpeg", odd)
    host = []
    got = decode_crops(payloads, boxes, 16, "cpu", host=lambda b: host.append(b) or dev.host_crops(b, boxes[b]))
    assert host == [1] and got.shape == (4, 3, 16, 16)
    assert torch.equal(got[0, 0], got[0, 1]) and torch.equal(got[0, 1], got[0, 2])  # file 0: grey, 3 channels


def _odd_folder(root) -> str:
    """root/train/a: 6 RGB JPEGs plus the odd files of a real ImageNet train set: a CMYK JPEG, a PNG named .JPEG,
    a grey JPEG and a truncated JPEG (its header reads; PIL and libjpeg refuse the data)."""
    _jpeg_folder(root, n=6)
    folder = os.path.join(str(root), "train", "a")
    picture = _picture(60, 45, seed=9)
    picture.convert("CMYK").save(os.path.join(folder, "cmyk.JPEG"), format="JPEG", quality=90)
    picture.save(os.path.join(folder, "png.JPEG"), format="PNG")
    picture.convert("L").save(os.path.join(folder, "grey.JPEG"), format="JPEG", quality=90)
    picture.save(os.path.join(folder, "truncated.JPEG"), format="JPEG", quality=90)
    path = os.path.join(folder, "truncated.JPEG")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return str(root)


def test_odd_files_follow_bad_images_and_are_logged_once_per_epoch(tmp_path, monkeypatch, pcl_warnings):
    """--bad-images fail names the truncated file as the PIL path does; skip trains on, the file replaced by the
    next readable one; the files the device refused are counted and logged once per epoch."""
    root = _odd_folder(tmp_path / "data")
    flags = ("--dataset", "imagefolder", root, "--image-size", "16", "-b", "5", "--workers", "0", "--aug-plus",
             "--augment", "device", "--decode", "device", "--seed", "1")
    args = tiny_args(tmp_path / "exp", *flags)
    with pytest.raises(PCLError, match=r"cannot read image .*truncated.JPEG .*pass --bad-images skip"):
        list(build_pretrain_data(data_settings(args), device=torch.device("cpu")).train_loader)
    grey = open(os.path.join(root, "train", "a", "grey.JPEG"), "rb").read()
    _refusing(monkeypatch, {grey})  # and the device decoder refuses the grey one (the CPU decoder takes it)
    train = build_pretrain_data(data_settings(tiny_args(tmp_path / "exp", *flags, "--bad-images", "skip")),
                                device=torch.device("cpu")).train_loader
    for epoch in (0, 1):
        batches = _epoch(train, epoch)
        assert len(batches) == 2 and all(torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all() for b in batches)
        assert sorted(os.path.basename(p) for p in train.host_decoded) == ["grey.JPEG", "truncated.JPEG"]
    logged = [w for w in pcl_warnings if w.startswith("--decode device:")]
    assert len(logged) == 2 and "2 files of epoch 0" in logged[0] and "2 files of epoch 1" in logged[1]


def test_decode_device_refuses_a_torchvision_without_the_batched_decode(tmp_path, monkeypatch):
    import torchvision

    from pcl.data.device_input import check_torchvision

    check_torchvision("0.19.0")
    check_torchvision("0.26.0+cu128")
    with pytest.raises(PCLError, match=r"--decode device needs torchvision >= 0.19 .* this is 0.18.1: .*--decode cpu"):
        check_torchvision("0.18.1")
    monkeypatch.setattr(torchvision, "__version__", "0.16.2")
    with pytest.raises(PCLError, match="this is 0.16.2"):
        _device_data(tmp_path, "--decode", "device")


def test_decode_device_needs_augment_device(tmp_path):
    assert tiny_args(tmp_path / "x").decode == "cpu"
    root = _jpeg_folder(tmp_path / "data", n=2)
    args = tiny_args(tmp_path / "exp", "--dataset", "imagefolder", root, "--decode", "device")
    with pytest.raises(PCLError) as err:
        build_pretrain_data(data_settings(args), device=torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and "--decode device" in message and "--augment device" in message


def test_tiny_pretraining_with_device_decoding(tmp_path, monkeypatch):
    """fit end to end with --augment device --decode device on a folder of JPEGs (the device: the CPU)."""
    import pcl.engine as engine

    built = []
    real = engine.build_pretrain_data
    monkeypatch.setattr(engine, "build_pretrain_data", lambda cfg, **k: built.append(real(cfg, **k)) or built[-1])
    root = tmp_path / "data"
    for i in range(12):
        folder = root / "train" / "abc"[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        _picture(24, 20, seed=i).save(folder / f"{i}.jpg", quality=90)
    args = tiny_args(tmp_path / "exp", "--dataset", "imagefolder", str(root), "--image-size", "16", "-b", "4",
                     "--num-cluster", "2,3", "--epochs", "2", "--warmup-epoch", "1", "--pcl-r", "8", "--aug-plus",
                     "--augment", "device", "--decode", "device", "--seed", "0", "--bn-splits", "2")
    stats = engine.fit(args)
    assert isinstance(built[0].train_loader, DeviceAugmentLoader) and built[0].train_loader.decode_size == 16
    assert stats["epoch"] == 1 and torch.isfinite(torch.tensor(float(stats["loss_proto"])))
    assert torch.isfinite(torch.tensor(float(stats["loss"])))


def test_a_batch_the_decoder_refuses_is_decoded_one_by_one_when_every_file_decodes(tmp_path, monkeypatch):
    import io

    import pcl.data.device_input as loaders
    from torchvision.io import decode_jpeg

    def jpeg(colour):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buf, format="JPEG", quality=90)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    data = [jpeg((200, 10, 10)), jpeg((10, 200, 10))]
    refused = []

    def batch_refused(payload, **kwargs):  # as nvJPEG's batched path might refuse what its single path takes
        if isinstance(payload, list):
            refused.append(len(payload))
            raise RuntimeError("batched decode failed")
        return decode_jpeg(payload, **kwargs)

    monkeypatch.setattr(loaders, "decode_jpeg", batch_refused)
    boxes = torch.tensor([[[0, 0, 16, 16, 0]] * 2] * 2)  # both views of both files: the whole picture, unflipped
    out = decode_crops(data, boxes, 16, "cpu", ["a.jpg", "b.jpg"])  # first views, then second ones
    assert refused == [2] and out.shape == (4, 3, 16, 16)
    assert torch.equal(out[0], decode_jpeg(data[0])) and torch.equal(out[1], decode_jpeg(data[1]))


def _decode_loader(tmp_path, n: int = 24, batch: int = 4):
    root = _jpeg_folder(tmp_path / "data", n=n)
    args = tiny_args(tmp_path / "exp", "--dataset", "imagefolder", root, "--image-size", "16", "-b", str(batch),
                     "--workers", "0", "--aug-plus", "--augment", "device", "--decode", "device", "--seed", "2")
    return build_pretrain_data(data_settings(args), device=torch.device("cpu")).train_loader


def test_the_training_thread_issues_no_input_work(tmp_path):
    """Decode, crops, augmentation and copies run in the prefetch thread (on CUDA on a side stream joined by an
    event): the training thread's next() issues no tensor op at all, so no sync or blocking copy either (it
    decoded and augmented every batch itself, after a stream sync)."""
    from torch.overrides import TorchFunctionMode

    class Ops(TorchFunctionMode):  # thread-local: sees only the calling thread's tensor ops
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    train = _decode_loader(tmp_path)
    want = _epoch(train, 0)
    train.set_epoch(0)
    it = iter(train)
    got = [next(it)]  # the first batch: the workers start in this thread
    ops = Ops()
    with ops:
        got += list(it)
    assert ops.calls == [] and len(got) == len(want) == 6
    assert all(torch.equal(x[2], y[2]) and x[0].shape == y[0].shape for x, y in zip(got, want))  # the same order


def test_input_wait_counts_only_a_batch_not_ready_yet(tmp_path, monkeypatch):
    """A decode of 40 ms per batch and a step of 60 ms: the decode of batch i + 1 overlaps step i, so the input
    wait is the first batch's only (it was every decode plus, on CUDA, the step's queued GPU work, and the monitor
    warned that the input pipeline bounds the run)."""
    import time

    import pcl.data.device_input as device_input
    from pcl.log import InputClock

    real = device_input.decode_jpeg
    monkeypatch.setattr(device_input, "decode_jpeg", lambda *a, **k: time.sleep(0.04) or real(*a, **k))
    train, clock = _decode_loader(tmp_path), InputClock()
    for _ in clock.timed(train):
        time.sleep(0.06)  # the training step
    assert clock.batches == 6 and clock.stats()["input_wait"] < 0.25, clock.stats()


def test_a_pass_left_early_stops_its_thread_and_resumes_exactly(tmp_path):
    """Mid-epoch state = the batches the loop took, not the prefetched ones; the next pass starts clean."""
    import threading

    train = _decode_loader(tmp_path)
    full = _epoch(train, 0)
    train.set_epoch(0)
    it = iter(train)
    taken = [next(it), next(it)]
    state = train.state_dict()
    assert state["step"] == 2  # the prefetch thread is further on
    train.set_epoch(0)  # stops the pass still prefetching
    assert not any(t.name == "pcl-prefetch" and t.is_alive() for t in threading.enumerate())
    assert list(it) == []  # a stopped pass yields nothing more
    train.load_state_dict(state)
    rest = [tuple(t.clone() for t in b) for b in train]
    assert len(rest) == 4 and all(torch.equal(x[2], y[2]) for x, y in zip(rest, full[2:]))
    assert all(torch.equal(x[2], y[2]) for x, y in zip(taken, full[:2]))


def test_the_e_steps_centre_crops_are_decoded_on_the_device_too(tmp_path, monkeypatch, pcl_warnings):
    """--decode device reaches the E-step's feature pass: the workers send bytes (a PNG named .jpg is cropped
    there), the device decodes, resizes and centre-crops within a level of the PIL eval transform; the subset
    loader (the bank's fill pass) and the gallery's host crops follow the same files."""
    from pcl.data import DeviceEvalLoader, EncodedImages, eval_transform

    root = _jpeg_folder(tmp_path / "data", n=6, size=(90, 70))
    _picture(60, 80, seed=9).save(os.path.join(root, "train", "a", "png_named.jpg"), format="PNG")
    args = tiny_args(tmp_path / "exp", "--dataset", "imagefolder", root, "--image-size", "32", "--aug-plus",
                     "--augment", "device", "--decode", "device")
    data = build_pretrain_data(data_settings(args), device=torch.device("cpu"))
    loader = data.eval_loader
    assert isinstance(loader, DeviceEvalLoader) and isinstance(loader.inner.loader.dataset, EncodedImages)
    base = SafeImages(tvd.ImageFolder(os.path.join(root, "train"), loader=load_image))
    want = torch.stack([eval_transform(32)(base[i][0]) for i in range(len(base))])  # the official path's
    got, index = map(torch.cat, zip(*list(loader)))
    assert torch.equal(index, torch.arange(len(base)))
    levels = ((got - want) * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255).abs()
    assert float(levels.mean()) < MEAN_TOL and float(levels.max()) <= MAX_TOL
    subset = data.subset_loader(torch.tensor([1, 4]))
    got_subset, index_subset = map(torch.cat, zip(*list(subset)))
    assert torch.equal(index_subset, torch.tensor([1, 4])) and torch.equal(got_subset, got[[1, 4]])
    shown, shown_index = loader.loader.dataset[4]
    assert shown_index == 4 and torch.allclose(shown, want[4], atol=1e-6)  # the host's crop for the gallery
