"""Seeded, resumable loaders: files (DataLoader workers) and in-memory tensors, the shard sampler, the wrappers
that finish file batches on the training device (``--augment device``; with ``--decode device`` the JPEGs are
decoded there too), and the seed of every (run, epoch, rank) stream."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pcl import PCLError, distributed as dist_utils
from pcl.data.device_input import SideStreamPrefetch, check_torchvision, decode_centre_crops, decode_crops
from pcl.data.tensor_augment import TensorAugment
from pcl.data.transforms import MEAN, STD


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
logger = logging.getLogger("pcl")


class DeviceAugmentLoader:
    """``--augment device``: a :class:`FileLoader` whose workers yield uint8 crops (``pretrain_crop_transform``:
    the official RandomResizedCrop + flip), finished on ``device``. Each batch (uint8 B x 3 x S x S per view,
    pinned by the DataLoader when ``device`` is CUDA) is copied as uint8 (4x less than float32) without blocking,
    then both views go through ``augment`` (a ``TensorAugment(crop=False)``: colour jitter, grayscale,
    blur, normalisation) as one 2B batch, drawn from this loader's own generator on ``device``, seeded per epoch
    from ``epoch_seed(seed, epoch, rank, DEVICE_AUG_OFFSET)``. Yields (im_q, im_k, index), all on ``device``.

    With ``decode_size`` (``--decode device``) the inner loader's dataset is an :class:`EncodedPairs` collated by
    :func:`collate_encoded`: its batches are JPEG bytes and crop boxes, decoded, cropped and resized to
    ``decode_size`` on ``device`` (:func:`decode_crops`) before the same augmentation. A file the device decoder
    refuses is decoded on the host with the same boxes (:meth:`EncodedPairs.host_crops`: ``--bad-images``
    applies), counted in ``host_decoded`` and logged once per epoch.

    All of it runs in a :class:`SideStreamPrefetch` thread (on CUDA on a side stream), two batches ahead: the
    training thread only waits for a batch that is not ready yet (what ``InputClock`` counts as input wait), never
    for the GPU to finish its step. ``state_dict`` is the inner loader's position plus the generator's state after
    the last batch the training loop took (not the prefetched ones), so a mid-epoch resume continues the device
    draws exactly (the workers' crops, as with ``FileLoader``, are not replayed; at an epoch start both are).
    """

    def __init__(self, inner: FileLoader, augment: TensorAugment, device: torch.device | str, seed: int,
                 decode_size: int | None = None) -> None:
        if decode_size is not None:
            check_torchvision()
        self.inner, self.augment, self.device, self.seed = inner, augment, torch.device(device), seed
        self.decode_size = decode_size
        self.generator = torch.Generator(device=self.device)
        self.host_decoded: list[str] = []  # this epoch's files the device decoder refused
        self._taken: dict[str, Any] | None = None  # the state after the last batch the consumer took
        self._prefetch: SideStreamPrefetch | None = None
        self.set_epoch(0)

    def _stop_prefetch(self) -> None:
        """Stop a pass still prefetching (an iteration left early) before the position or the draws change."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def set_epoch(self, epoch: int) -> None:
        self._stop_prefetch()
        self.inner.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.inner.rank, DEVICE_AUG_OFFSET))
        self._taken, self.epoch = None, epoch

    def state_dict(self) -> dict[str, Any]:
        if self._taken is not None:
            return dict(self._taken)
        return {**self.inner.state_dict(), "device_aug_gen": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue mid-epoch (call after ``set_epoch``); a state saved without ``--augment device`` positions the
        sample order only."""
        self._stop_prefetch()
        self.inner.load_state_dict(state)
        if "device_aug_gen" in state:
            self.generator.set_state(state["device_aug_gen"])
        self._taken = None

    def __len__(self) -> int:
        return len(self.inner)

    def _views(self, first: Any, second: Any, index: torch.Tensor) -> torch.Tensor:
        """Both views of a worker batch on the device, uint8 2B x 3 x S x S (decoded there with --decode device)."""
        if self.decode_size is None:  # first, second: uint8 B x 3 x S x S crops
            return torch.cat([first.to(self.device, non_blocking=True), second.to(self.device, non_blocking=True)])
        pairs = self.inner.loader.dataset  # first: B payloads, second: boxes B x 2 x 5

        def host(b: int) -> torch.Tensor:
            self.host_decoded.append(pairs.samples[int(index[b])][0])
            return pairs.host_crops(int(index[b]), second[b])

        return decode_crops(first, second, self.decode_size, self.device, host=host)

    def _prepare(self, batch: tuple) -> tuple:
        """One worker batch made ready (in the prefetch thread): (im_q, im_k, index on the device, the state after)."""
        first, second, index = batch
        b = len(index)
        out = self.augment(self._views(first, second, index), self.generator)  # float 2B x 3 x S x S, normalised
        state = {**self.inner.state_dict(), "device_aug_gen": self.generator.get_state()}
        return out[:b], out[b:], torch.as_tensor(index).to(self.device, non_blocking=True), state

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._stop_prefetch()
        self.host_decoded = []
        batches = iter(self.inner)
        first = next(batches, None)  # the workers start here, in the caller's thread
        if first is None:
            return
        self._prefetch = prefetch = SideStreamPrefetch(self._prepare, _chain(first, batches), self.device)
        try:
            for im_q, im_k, index, state in prefetch:
                self._taken = state
                yield im_q, im_k, index
            self._taken = None  # the epoch is over: the inner loader's position is back at its start
        finally:
            prefetch.close()
            if self._prefetch is prefetch:
                self._prefetch = None
        if self.host_decoded:
            logger.warning("--decode device: %d files of epoch %d were decoded on the host (the device decoder "
                           "refused them), e.g. %s", len(self.host_decoded), self.epoch, self.host_decoded[0])


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


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


class _HostCrops(Dataset):
    """(uint8 centre crop decoded on the host, index) of each item of ``items`` (an :class:`EncodedImages` or a
    Subset of one, ``encoded``): what the gallery shows of a ``--decode device`` feature pass."""

    def __init__(self, items: Dataset, encoded: Any) -> None:
        self.items, self.encoded = items, encoded

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = int(self.items[position][1])
        return self.encoded.host_crop(index), index


class _DatasetView:
    """Stands in for a DataLoader where only its ``dataset`` is read."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset


class DeviceEvalLoader:
    """``--augment device``'s feature pass: a :class:`FileLoader` of uint8 center crops (``eval_crop_transform``)
    copied as uint8 and normalised on ``device``. Yields (images B x 3 x S x S float on ``device``, index on
    ``device``) in the inner loader's order. ``.loader.dataset`` gives normalised single images (the gallery).

    With ``decode_size`` (``--decode device``) the inner loader's dataset is an :class:`EncodedImages` collated by
    :func:`collate_encoded_images`: JPEG bytes, decoded, resized and centre-cropped on ``device``
    (:func:`decode_centre_crops`) in a prefetch thread on a side stream (:class:`SideStreamPrefetch`)."""

    def __init__(self, inner: FileLoader, device: torch.device | str, decode_size: int | None = None) -> None:
        self.inner, self.device, self.decode_size = inner, torch.device(device), decode_size
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        dataset = inner.loader.dataset
        if decode_size is not None:  # the gallery's single images: the same crops, decoded on the host
            self.encoded = getattr(dataset, "dataset", dataset)  # an EncodedImages, or a Subset of one
            dataset = _HostCrops(dataset, self.encoded)
        self.loader = _DatasetView(NormalisedImages(dataset))

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def _prepare(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        payloads, index = batch
        if self.decode_size is None:
            images = payloads.to(self.device, non_blocking=True)  # uint8 B x 3 x S x S
        else:
            images = decode_centre_crops(payloads, self.decode_size, self.device,
                                         lambda b: self.encoded.host_crop(int(index[b])))
        x = images.float() / 255.0
        return (x - self.mean) / self.std, torch.as_tensor(index).to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.decode_size is None:
            yield from map(self._prepare, self.inner)
            return
        prefetch = SideStreamPrefetch(self._prepare, self.inner, self.device)
        try:
            yield from prefetch
        finally:
            prefetch.close()


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
