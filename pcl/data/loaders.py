"""Seeded, resumable loaders: files (DataLoader workers) and in-memory tensors, the shard sampler, the wrappers
that finish file batches on the training device (``--augment device``; with ``--decode device`` the JPEGs are
decoded there too), and the seed of every (run, epoch, rank) stream."""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torchvision.transforms.v2.functional as F2
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.io import ImageReadMode, decode_jpeg

from pcl import PCLError, distributed as dist_utils
from pcl.data.datasets import open_regular
from pcl.data.tensor_augment import TensorAugment
from pcl.data.transforms import MEAN, STD, PretrainCropBoxes


SEED_RANGE = 2 ** 63  # every derived seed is taken modulo this: torch.Generator.manual_seed's signed 64 bits


def epoch_seed(seed: int, epoch: int, rank: int | None = None, offset: int = 0) -> int:
    """The seed of a loader's draws in one epoch: without ``rank`` the sample order (the same on every rank),
    with it the rank's augmentation stream (``offset`` separates streams of one rank). Every loader seeds here,
    so resuming at an epoch replays it exactly. Taken modulo 2**63 (torch.Generator's range: any --seed works;
    the seeds of --seed values below about 10**10 are unchanged)."""
    base = seed * 100_003 + epoch
    return (base if rank is None else base * 1009 + rank + offset) % SEED_RANGE


def stream_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """The seed of the training loop's generators (0: torch's global RNG, 1: shuffle-BN, 2: negative prototypes)
    for one (run, epoch, rank). A separate formula from :func:`epoch_seed` on purpose: both are what earlier runs
    and checkpoints were drawn with, and changing either would change every result."""
    return (((seed * 1_000_003 + epoch) * 1009 + rank) * 17 + stream) % SEED_RANGE


RANK_STRIDE = 1_000_003  # more than any run's epochs: rank r's worker streams never meet rank 0's of another epoch


def worker_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a file loader's worker augmentation streams (the DataLoader draws its workers' base seed from a
    generator seeded here) in one epoch on one rank. Not as official, on purpose: the official code seeds every
    rank alike, so sample p of every rank's batch gets the same crop, flip, colour jitter and blur (and so did
    this code before); here rank r's seed is offset by r x RANK_STRIDE. Rank 0 keeps epoch_seed(seed, epoch), so
    one-process runs draw exactly what they drew before."""
    return (epoch_seed(seed, epoch) + rank * RANK_STRIDE) % SEED_RANGE


class ShardSampler(Sampler[int]):
    """Indices rank, rank + W, ... in order: every sample on exactly one rank, no padding (exact gathers)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class FileLoader:
    """A DataLoader whose shuffling and worker seeds are a function of (seed, epoch): resumable exactly."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int, train: bool,
                 pin_memory: bool = False, drop_last: bool | None = None, prefetch_factor: int = 2,
                 persistent_workers: bool = False, timeout_min: float = 0.0,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        rank, world = dist_utils.rank(), dist_utils.world_size()
        self.timeout_min = timeout_min if workers > 0 else 0.0
        self.seed, self.rank = seed, rank
        drop_last = train if drop_last is None else drop_last
        if train:
            self.sampler: Sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                       seed=seed, drop_last=drop_last)
        else:
            self.sampler = ShardSampler(len(dataset), rank, world)
        self.generator = torch.Generator()
        self.skip, self.step = _SkipSampler(self.sampler), 0
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.skip, num_workers=workers,
                                 pin_memory=pin_memory, drop_last=drop_last, generator=self.generator,
                                 persistent_workers=persistent_workers and workers > 0,
                                 prefetch_factor=prefetch_factor if workers > 0 else None,
                                 timeout=self.timeout_min * 60, collate_fn=collate_fn)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(worker_seed(self.seed, epoch, self.rank))  # the workers' augmentation draws
        self.skip.count, self.step = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue mid-epoch: the same sample order minus the batches already trained on. (Worker-side
        augmentation draws are not replayed, so a file dataset resumes the order exactly, not the crops.)"""
        self.step = int(state["step"])
        self.skip.count = self.step * self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        first = self.step
        try:
            for i, batch in enumerate(self.loader):
                self.step = first + i + 1
                yield batch
        except RuntimeError as e:
            if self.timeout_min and "timed out" in str(e):
                raise PCLError(f"rank {self.rank}: no batch came from the loader workers for --loader-timeout "
                               f"{self.timeout_min:g} min (batch {self.step + 1} of {len(self)}); a worker is blocked, "
                               "most often on a stuck network file system. Check the data root's mount, then rerun "
                               "with --resume auto") from None
            raise
        self.skip.count, self.step = 0, 0


class _SkipSampler(Sampler[int]):
    """Wraps a sampler and drops its first ``count`` indices (set before iterating)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner, self.count = inner, 0

    def __iter__(self) -> Iterator[int]:
        it = iter(self.inner)
        for _ in range(self.count):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(len(self.inner) - self.count, 0)


DEVICE_AUG_OFFSET = 3  # epoch_seed offset of DeviceAugmentLoader's stream (TensorLabelledLoader's is 7)

DEVICE_JPEG = {"JPEG", "MPO"}  # PIL's names of files decode_jpeg reads (MPO: a camera JPEG; its first frame)
DEVICE_JPEG_MODES = {"RGB", "L"}  # colour JPEGs and grey ones (decoded to 3 equal channels, as PIL's convert)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # as SafeImages catches them


class EncodedPairs(Dataset):
    """``--decode device``: the workers' side of the two-crop pretraining set of an image-file dataset (a
    ``SafeImages`` ImageFolder: ``.samples`` gives each file). Item ``index`` is (payload, boxes, index), boxes
    int64 2 x 5: (top, left, height, width, flip) of the two views, drawn by :class:`PretrainCropBoxes` (the
    official crop, then flip, per view: the boxes ``pretrain_crop_transform`` takes for the worker's RNG state).

    The payload of an RGB or grey JPEG is the file's bytes (uint8, 1-D, undecoded: ``PIL.Image.open`` reads only
    the header, for the size and mode), decoded, cropped and resized on the device (:func:`decode_crops`). Any other
    file (PNG, CMYK/YCCK JPEG, one whose header PIL cannot read) is decoded here by the base dataset (its
    ``--bad-images`` policy included) and both crops taken here with the same draws: payload uint8 2 x 3 x S x S,
    exactly what ``--decode cpu`` gives for that file."""

    def __init__(self, base: Dataset, boxes: PretrainCropBoxes) -> None:
        self.base, self.boxes = base, boxes
        self.samples = base.samples  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _jpeg(self, index: int) -> tuple[bytes, int, int] | None:
        """The file's bytes and (width, height) when the device can decode it, else None."""
        try:
            with open_regular(self.samples[index][0]) as f:  # a FIFO named .JPEG: an error, not a blocked read
                data = f.read()
            with Image.open(io.BytesIO(data)) as img:  # the header only: nothing decoded
                if img.format not in DEVICE_JPEG or img.mode not in DEVICE_JPEG_MODES:
                    return None
                width, height = img.size
        except _DECODE_ERRORS:
            return None  # the base dataset reads it again and applies --bad-images
        return data, width, height

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        jpeg = self._jpeg(index)
        if jpeg is None:
            img = self.base[index][0]  # RGB PIL image, decoded here
            boxes = [self.boxes(*img.size) for _ in range(2)]  # view 1's crop and flip, then view 2's
            crops = torch.stack([self.boxes.apply(img, box) for box in boxes])  # uint8 2 x 3 x S x S
            return crops, torch.tensor(boxes, dtype=torch.long), index
        data, width, height = jpeg
        boxes = [self.boxes(width, height) for _ in range(2)]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor(boxes, dtype=torch.long), index


def collate_encoded(batch: list[tuple[torch.Tensor, torch.Tensor, int]]
                    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:class:`EncodedPairs` items as one batch: the payloads as a list (JPEG byte strings differ in length),
    boxes int64 B x 2 x 5, index int64 B."""
    return ([item[0] for item in batch], torch.stack([item[1] for item in batch]),
            torch.tensor([item[2] for item in batch], dtype=torch.long))


def _decode_jpegs(data: list[torch.Tensor], device: torch.device, names: Sequence[str] | None
                  ) -> list[torch.Tensor]:
    """decode_jpeg on a list of byte tensors (CPU tensors, decoded on ``device``: nvJPEG, batched, on CUDA) as RGB:
    uint8 3 x H x W each. A file that fails is one PCLError naming it (found by decoding one at a time).

    On CUDA the caller's stream is synchronised first: the CUDA decoder takes its outputs from the caching allocator
    on the caller's stream but writes them from another one without waiting, so it can overwrite memory that queued
    kernels still read (pytorch/vision PR 9606; torchcodec PR 1634 adds the same wait). The decode host-synchronises
    its own stream anyway, so this only moves the wait earlier, past the previous step's queued kernels."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    try:
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # find the file; when each decodes alone, the batch is decoded one by one
        out = []
        for k, one in enumerate(data):
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                name = names[k] if names is not None else f"JPEG {k} of the batch"
                raise PCLError(f"cannot decode {name} on {device} ({str(e)[:120]}); fix or remove it, or pass "
                               "--decode cpu (--bad-images skip covers only files that fail in the workers)") from None
    return list(out) if isinstance(out, torch.Tensor) else out


def decode_crops(payloads: Sequence[torch.Tensor], boxes: torch.Tensor, size: int, device: torch.device | str,
                 names: Sequence[str] | None = None) -> torch.Tensor:
    """The two views of a :func:`collate_encoded` batch on ``device``: uint8 2B x 3 x size x size, the B first
    views then the B second ones (the layout :class:`DeviceAugmentLoader` augments).

    JPEG payloads (1-D bytes) are decoded in one ``decode_jpeg`` call, then per view the box is cropped, resized
    to size x size (torchvision's antialiased bilinear on the uint8 tensor: on the CPU its uint8 kernel, within
    1/255 of PIL's resize; on CUDA in float, rounded) and flipped. Payloads the workers decoded (2 x 3 x S x S)
    are copied as they are. ``names`` (one per payload) name a file that cannot be decoded."""
    device = torch.device(device)
    jpeg = [k for k, p in enumerate(payloads) if p.dim() == 1]
    images = dict(zip(jpeg, _decode_jpegs([payloads[k] for k in jpeg], device,
                                          [names[k] for k in jpeg] if names is not None else None))) if jpeg else {}
    crops = torch.empty(2, len(payloads), 3, size, size, dtype=torch.uint8, device=device)  # view x B x 3 x S x S
    for b, box_pair in enumerate(boxes.tolist()):  # B x 2 x 5 on the CPU: no device syncs
        if b not in images:
            crops[:, b] = payloads[b].to(device, non_blocking=True)  # cropped in the worker
            continue
        for v, (i, j, h, w, flip) in enumerate(box_pair):
            crop = F2.resized_crop(images[b], i, j, h, w, [size, size], antialias=True)  # uint8 3 x S x S
            crops[v, b] = crop.flip(-1) if flip else crop
    return crops.flatten(0, 1)


class DeviceAugmentLoader:
    """``--augment device``: a :class:`FileLoader` whose workers yield uint8 crops (``pretrain_crop_transform``:
    the official RandomResizedCrop + flip), finished on ``device``. Each batch (uint8 B x 3 x S x S per view,
    pinned by the DataLoader when ``device`` is CUDA) is copied as uint8 (4x less than float32) without blocking,
    then both views go through ``augment`` (a ``TensorAugment(crop=False)``: colour jitter, grayscale,
    blur, normalisation) as one 2B batch, drawn from this loader's own generator on ``device``, seeded per epoch
    from ``epoch_seed(seed, epoch, rank, DEVICE_AUG_OFFSET)``. Yields (im_q, im_k, index), all on ``device``.

    With ``decode_size`` (``--decode device``) the inner loader's dataset is an :class:`EncodedPairs` collated by
    :func:`collate_encoded`: its batches are JPEG bytes and crop boxes, decoded, cropped and resized to
    ``decode_size`` on ``device`` (:func:`decode_crops`) before the same augmentation.

    ``state_dict`` is the inner loader's plus the generator's state, so a mid-epoch resume continues the device
    draws exactly (the workers' crops, as with ``FileLoader``, are not replayed; at an epoch start both are).
    """

    def __init__(self, inner: FileLoader, augment: TensorAugment, device: torch.device | str, seed: int,
                 decode_size: int | None = None) -> None:
        self.inner, self.augment, self.device, self.seed = inner, augment, torch.device(device), seed
        self.decode_size = decode_size
        self.generator = torch.Generator(device=self.device)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.inner.rank, DEVICE_AUG_OFFSET))

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "device_aug_gen": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue mid-epoch (call after ``set_epoch``); a state saved without ``--augment device`` positions the
        sample order only."""
        self.inner.load_state_dict(state)
        if "device_aug_gen" in state:
            self.generator.set_state(state["device_aug_gen"])

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for first, second, index in self.inner:
            b = len(index)
            if self.decode_size is None:  # first, second: uint8 B x 3 x S x S crops
                views = torch.cat([first.to(self.device, non_blocking=True),
                                   second.to(self.device, non_blocking=True)])  # uint8 2B x 3 x S x S
            else:  # first: B payloads, second: boxes B x 2 x 5
                samples = self.inner.loader.dataset.samples
                views = decode_crops(first, second, self.decode_size, self.device,
                                     [samples[int(k)][0] for k in index])
            out = self.augment(views, self.generator)  # float 2B x 3 x S x S, normalised
            yield out[:b], out[b:], torch.as_tensor(index).to(self.device, non_blocking=True)


class NormalisedImages(Dataset):
    """A view of a dataset of (uint8 image, ...) items whose image comes out float and ImageNet-normalised, as
    the PIL eval transform gives it: what ``gallery.display_images`` reads through ``loader.loader.dataset``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.mean, self.std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, *rest = self.base[index]
        return ((image.float() / 255.0 - self.mean) / self.std, *rest)


class _DatasetView:
    """Stands in for a DataLoader where only its ``dataset`` is read."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset


class DeviceEvalLoader:
    """``--augment device``'s feature pass: a :class:`FileLoader` of uint8 center crops (``eval_crop_transform``)
    copied as uint8 and normalised on ``device``. Yields (images B x 3 x S x S float on ``device``, index on
    ``device``) in the inner loader's order. ``.loader.dataset`` gives normalised single images (the gallery)."""

    def __init__(self, inner: FileLoader, device: torch.device | str) -> None:
        self.inner, self.device = inner, torch.device(device)
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        self.loader = _DatasetView(NormalisedImages(inner.loader.dataset))

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, index in self.inner:
            x = images.to(self.device, non_blocking=True).float() / 255.0  # B x 3 x S x S
            yield (x - self.mean) / self.std, torch.as_tensor(index).to(self.device, non_blocking=True)


class TensorPairLoader:
    """Yields (im_q, im_k, index) from an in-memory uint8 tensor; shuffling and augmentation are seeded by
    (seed, epoch, rank), so an epoch is reproduced exactly on resume. Each rank takes its slice of every
    global batch (batch_size is per process). ``state_dict``/``load_state_dict`` continue mid-epoch exactly."""

    def __init__(self, images: torch.Tensor, batch_size: int, augment: TensorAugment, seed: int) -> None:
        self.images, self.batch_size, self.augment, self.seed = images, batch_size, augment, seed
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.epoch, self.step, self._start = 0, 0, None
        self._aug_gen: torch.Generator | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start = epoch, None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "aug_gen": self._aug_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start = state

    def __len__(self) -> int:
        total = self.images.shape[0] // (self.batch_size * self.world)
        return total - (self._start["step"] if self._start else 0)

    def __iter__(self):
        order_gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        self._aug_gen = aug_gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        perm = torch.randperm(self.images.shape[0], generator=order_gen)
        step = self.batch_size * self.world
        first, total = 0, self.images.shape[0] // step
        if self._start is not None:
            first = self._start["step"]
            aug_gen.set_state(self._start["aug_gen"])
            self._start = None
        for i in range(first, total):
            idx = perm[i * step:(i + 1) * step][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            x = self.images[idx]
            self.step = i + 1
            yield self.augment(x, aug_gen), self.augment(x, aug_gen), idx


class TensorEvalLoader:
    """Yields (normalised images, index) in order over this rank's shard (no padding); with ``indices``, over
    those samples only (this rank's every world-th of them)."""

    def __init__(self, images: torch.Tensor, batch_size: int, shard: bool = True,
                 indices: torch.Tensor | None = None) -> None:
        self.images, self.batch_size = images, batch_size
        rank, world = (dist_utils.rank(), dist_utils.world_size()) if shard else (0, 1)
        chosen = torch.arange(images.shape[0]) if indices is None else torch.as_tensor(indices).long().cpu()
        self.indices = chosen[rank::world]
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for s in range(0, len(self.indices), self.batch_size):
            idx = self.indices[s:s + self.batch_size]
            yield (self.images[idx].float() / 255.0 - self.mean) / self.std, idx


class TensorLabelledLoader:
    """(images, labels, index) batches from in-memory uint8 images. ``augment`` (a :class:`TensorAugment`)
    and shuffling are seeded by (seed, epoch, rank); without it, normalised images in order. Every rank
    takes every world-th sample (no padding)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 augment: TensorAugment | None = None, seed: int = 0, shuffle: bool = False) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.augment, self.seed, self.shuffle, self.epoch = augment, seed, shuffle, 0
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        order = torch.arange(n)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        return order[self.rank::self.world]

    def __len__(self) -> int:
        return math.ceil(len(self._indices()) / self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank, offset=7))
        indices = self._indices()
        for s in range(0, len(indices), self.batch_size):
            idx = indices[s:s + self.batch_size]
            x = self.images[idx]
            x = self.augment(x, gen) if self.augment is not None else (x.float() / 255.0 - self.mean) / self.std
            yield x, self.labels[idx], idx
