import os

import pytest
import torch

from pcl.data import ShardSampler, TensorAugment, TensorEvalLoader, TensorPairLoader, make_digits_demo


def test_demo_set_is_deterministic_and_split_by_source():
    a = make_digits_demo(renders_train=2, renders_test=1, seed=0)
    b = make_digits_demo(renders_train=2, renders_test=1, seed=0)
    assert torch.equal(a["train"], b["train"]) and torch.equal(a["test_labels"], b["test_labels"])
    assert a["train"].dtype == torch.uint8 and a["train"].shape[1:] == (3, 32, 32)
    assert a["train"].shape[0] == 2 * len(set(a["train_source"].tolist()))
    assert not set(a["train_source"].tolist()) & set(a["test_source"].tolist())
    assert len(set(a["train_source"].tolist())) + len(set(a["test_source"].tolist())) == 1797
    assert set(a["train_labels"].tolist()) == set(range(10))
    # two renders of the same digit differ (random position, scale, colours)
    assert not torch.equal(a["train"][0], a["train"][1])


def test_tensor_augment_is_seeded_and_shaped():
    images = make_digits_demo(renders_train=1, renders_test=1)["test"][:16]
    for plus in (False, True):
        aug = TensorAugment(24, plus)
        x1 = aug(images, torch.Generator().manual_seed(3))
        x2 = aug(images, torch.Generator().manual_seed(3))
        x3 = aug(images, torch.Generator().manual_seed(4))
        assert x1.shape == (16, 3, 24, 24) and torch.isfinite(x1).all()
        assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_pair_loader_replays_an_epoch_and_eval_loader_covers_all():
    images = torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8)
    loader = TensorPairLoader(images, 16, TensorAugment(8, False), seed=1)
    loader.set_epoch(3)
    first = [(q.clone(), idx.clone()) for q, _, idx in loader]
    loader.set_epoch(4)
    other = [idx for _, _, idx in loader]
    loader.set_epoch(3)
    again = [(q, idx) for q, _, idx in loader]
    assert len(first) == 3  # drop_last
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0])
    seen = torch.cat([idx for _, idx in TensorEvalLoader(images, 16)])
    assert torch.equal(seen, torch.arange(50))


def test_shard_sampler_partitions_without_padding():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_16_bit_png_keeps_its_contrast_instead_of_turning_white(tmp_path):
    import numpy as np
    from PIL import Image

    from pcl.data import load_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = np.asarray(load_image(str(tmp_path / "deep.png")))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and 240 <= rgb[7, 7, 0] <= 246 and len(np.unique(rgb[..., 0])) > 50
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).save(tmp_path / "plain.png")
    assert np.asarray(load_image(str(tmp_path / "plain.png")))[0, 0, 0] == 200  # 8-bit unchanged


def test_decompression_bomb_and_undecodable_names_are_handled(tmp_path, monkeypatch, capsys):
    import io
    import logging

    import numpy as np
    from PIL import Image

    from pcl import PCLError
    from pcl.data import SafeImages, image_folder

    for name in ("ok.png", "b\udcffad.png"):  # a file name that is not valid UTF-8
        folder = tmp_path / "train" / "c"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(os.fsencode(str(folder / name)), format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # every 64 x 64 image is now a "bomb" (> 2x the limit)
    strict = image_folder(str(tmp_path), "train", "fail")
    with pytest.raises(PCLError, match="DecompressionBombError"):
        strict[0]
    lenient = SafeImages(strict.base, "skip")
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a strict UTF-8 log stream
    handler = logging.StreamHandler(stream)
    logging.getLogger("pcl").addHandler(handler)
    try:
        with pytest.raises(PCLError, match="no readable image"):
            lenient[0]  # every file is skipped with a warning
    finally:
        logging.getLogger("pcl").removeHandler(handler)
    assert lenient.skipped == 2
    stream.flush()
    assert "b\\xffad.png" in stream.buffer.getvalue().decode()  # the odd byte as an escape, not a logging error
    assert "Logging error" not in capsys.readouterr().err
