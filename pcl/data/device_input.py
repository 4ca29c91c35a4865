"""The device side of the file input (``--augment device``): the thread that prepares the next batches on a side
stream while the GPU trains (:class:`SideStreamPrefetch`), and ``--decode device``: the loader workers read each
JPEG's bytes and header and draw the official crop boxes; the training device decodes the batch (torchvision's
``decode_jpeg``: nvJPEG on CUDA), crops and resizes. A file the device decoder refuses is decoded on the host
instead, through the base dataset (PIL, its ``--bad-images`` policy included), with the same boxes: the crops
``--decode cpu`` gives for that file."""

from __future__ import annotations

import io
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torchvision
import torchvision.transforms.v2.functional as F2
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from pcl import PCLError
from pcl.data.datasets import open_regular
from pcl.data.transforms import PretrainCropBoxes

DEVICE_JPEG = {"JPEG", "MPO"}  # PIL's names of files decode_jpeg reads (MPO: a camera JPEG; its first frame)
DEVICE_JPEG_MODES = {"RGB", "L"}  # colour JPEGs and grey ones (decoded to 3 equal channels, as PIL's convert)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # as SafeImages catches them
TORCHVISION_FLOOR = (0, 19)  # decode_jpeg on a list of files with device=: one batched call


def check_torchvision(version: str | None = None) -> None:
    """Refuse ``--decode device`` on a torchvision without the batched device decode, in one line."""
    version = version or torchvision.__version__
    numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if numbers < TORCHVISION_FLOOR:
        raise PCLError(f"--decode device needs torchvision >= {'.'.join(map(str, TORCHVISION_FLOOR))} (decode_jpeg "
                       f"on a batch of files with device=); this is {version}: upgrade torchvision, or pass "
                       f"--decode cpu")


class EncodedPairs(Dataset):
    """The workers' side of the two-crop pretraining set of an image-file dataset (a ``SafeImages`` ImageFolder:
    ``.samples`` gives each file). Item ``index`` is (payload, boxes, index), boxes int64 2 x 5: (top, left,
    height, width, flip) of the two views, drawn by :class:`PretrainCropBoxes` (the official crop, then flip, per
    view: the boxes ``pretrain_crop_transform`` takes for the worker's RNG state).

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

    def host_crops(self, index: int, boxes: torch.Tensor) -> torch.Tensor:
        """Both views of item ``index`` decoded on the host with the boxes (2 x 5) drawn for it: uint8 2 x 3 x S x S,
        what the workers give for a file the device cannot take. The base dataset reads it (PIL), so
        ``--bad-images fail`` names an unreadable file and ``skip`` replaces it by the next readable one, as on
        the PIL path; the replacement gets these boxes fitted into its own size (not a fresh draw: no RNG here)."""
        img = self.base[index][0]
        return torch.stack([self.boxes.apply(img, _fit(box, *img.size)) for box in boxes.tolist()])


def _fit(box: Sequence[int], width: int, height: int) -> list[int]:
    """A (top, left, height, width, flip) box moved and cut to lie inside a ``width`` x ``height`` image (the
    same box when it does)."""
    i, j, h, w, flip = (int(v) for v in box)
    h, w = min(h, height), min(w, width)
    return [min(i, height - h), min(j, width - w), h, w, flip]


def collate_encoded(batch: list[tuple[torch.Tensor, torch.Tensor, int]]
                    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:class:`EncodedPairs` items as one batch: the payloads as a list (JPEG byte strings differ in length),
    boxes int64 B x 2 x 5, index int64 B."""
    return ([item[0] for item in batch], torch.stack([item[1] for item in batch]),
            torch.tensor([item[2] for item in batch], dtype=torch.long))


_REFUSALS = (RuntimeError, ValueError)  # what decode_jpeg raises for a file it cannot decode


def _device_images(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """decode_jpeg on a list of byte tensors (CPU tensors, decoded on ``device``: nvJPEG, batched, on CUDA):
    uint8 3 x H x W each, None for a file the decoder refuses (found by decoding one at a time when the batch
    fails). A grey image returned with one channel is repeated to three (RGB, as PIL's convert)."""
    try:
        out = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except _REFUSALS:
        out = []
        for one in data:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except _REFUSALS:
                out.append(None)
    return [img.expand(3, -1, -1) if img is not None and img.dim() == 3 and img.shape[0] == 1 else img for img in out]


def _usable(img: torch.Tensor | None, box_pair: Sequence[Sequence[int]]) -> bool:
    """A decoded 3 x H x W image that holds both views' boxes (a decoder that returned something else is refused)."""
    return (img is not None and img.dim() == 3 and img.shape[0] == 3 and
            all(i + h <= img.shape[1] and j + w <= img.shape[2] for i, j, h, w, _ in box_pair))


def wait_for_queued_work(device: torch.device) -> None:
    """On CUDA, wait (this thread only) until the current stream's queued kernels are done; nothing elsewhere.

    The CUDA decoder takes its outputs from the caching allocator on the caller's stream but writes them from
    another one without waiting, so it can overwrite memory that queued kernels still read (pytorch/vision PR
    9606; torchcodec PR 1634 adds the same wait). :class:`pcl.data.loaders.DeviceAugmentLoader` decodes on a side
    stream of its own prefetch thread, so this waits for that stream's previous batch only, never for the
    training stream. An event, not a stream synchronize: the wait is by design, not a sync of the step."""
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        done.synchronize()


def decode_crops(payloads: Sequence[torch.Tensor], boxes: torch.Tensor, size: int, device: torch.device | str,
                 names: Sequence[str] | None = None,
                 host: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """The two views of a :func:`collate_encoded` batch on ``device``: uint8 2B x 3 x size x size, the B first
    views then the B second ones (the layout :class:`pcl.data.loaders.DeviceAugmentLoader` augments).

    JPEG payloads (1-D bytes) are decoded in one ``decode_jpeg`` call on the current stream, then per view the
    box is cropped, resized to size x size (torchvision's antialiased bilinear on the uint8 tensor: on the CPU its
    uint8 kernel, within 1/255 of PIL's resize; on CUDA in float, rounded) and flipped. Payloads the workers
    decoded (2 x 3 x S x S) are copied as they are. A JPEG the device decoder refuses goes to ``host(b)`` (b: its
    position in the batch), which returns its uint8 2 x 3 x S x S crops decoded on the host
    (:meth:`EncodedPairs.host_crops`); without ``host`` it is a PCLError naming it (``names``: one per payload)."""
    device = torch.device(device)
    wait_for_queued_work(device)
    jpeg = [k for k, p in enumerate(payloads) if p.dim() == 1]
    images = dict(zip(jpeg, _device_images([payloads[k] for k in jpeg], device))) if jpeg else {}
    crops = torch.empty(2, len(payloads), 3, size, size, dtype=torch.uint8, device=device)  # view x B x 3 x S x S
    for b, box_pair in enumerate(boxes.tolist()):  # B x 2 x 5 on the CPU: no device syncs
        if b not in images:
            crops[:, b] = payloads[b].to(device, non_blocking=True)  # cropped in the worker
        elif not _usable(images[b], box_pair):
            if host is None:
                name = names[b] if names is not None else f"JPEG {b} of the batch"
                raise PCLError(f"cannot decode {name} on {device}; fix or remove it, or pass --decode cpu")
            crops[:, b] = host(b).to(device, non_blocking=True)
        else:
            for v, (i, j, h, w, flip) in enumerate(box_pair):
                crop = F2.resized_crop(images[b], i, j, h, w, [size, size], antialias=True)  # uint8 3 x S x S
                crops[v, b] = crop.flip(-1) if flip else crop
    return crops.flatten(0, 1)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class SideStreamPrefetch:
    """``prepare`` applied to each of ``batches`` in a thread of its own, up to ``depth`` batches ahead of the
    consumer, so the input of step i + 1 is made while step i runs. On CUDA the thread works on a side stream of
    ``device``; each result (a tuple of tensors) is handed over by an event the consumer's current stream waits
    for, and marked as used by that stream (``record_stream``): no host sync, and the consumer's thread issues no
    input work at all. An error in the thread is raised in the consumer at the batch it happened at. ``close``
    stops the thread (after the batch it is on) and waits for it; the consumer then gets no more batches."""

    def __init__(self, prepare: Callable[[Any], tuple], batches: Iterable[Any], device: torch.device,
                 depth: int = 2) -> None:
        self.prepare, self.batches, self.device = prepare, batches, device
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread = threading.Thread(target=self._run, name="pcl-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with torch.no_grad():
                if self.stream is not None:
                    torch.cuda.set_device(self.device)  # a new thread starts on GPU 0
                for batch in self.batches:
                    if self.stream is None:
                        out, ready = self.prepare(batch), None
                    else:
                        with torch.cuda.stream(self.stream):
                            out, ready = self.prepare(batch), torch.cuda.Event()
                            ready.record(self.stream)
                    if not self._put((out, ready)):
                        return
            self._put(_END)
        except BaseException as e:  # re-raised in the consumer
            self._put(_Failure(e))

    def _put(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple]:
        while True:
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                if self.stopping.is_set() and not self.thread.is_alive():
                    return  # closed: nothing more comes
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            out, ready = item
            if ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)
                for t in out:
                    if torch.is_tensor(t) and t.is_cuda:
                        t.record_stream(current)
            yield out

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()


class EncodedImages(Dataset):
    """The workers' side of the E-step's centre-crop pass with ``--decode device`` (an image-file dataset with
    ``.samples``): item ``index`` is (payload, index). The payload of an RGB or grey JPEG is its bytes (uint8,
    1-D; PIL reads the header only), decoded, resized and centre-cropped on the device
    (:func:`decode_centre_crops`); any other file is decoded and cropped here by ``crop`` (the eval crop
    transform, uint8 3 x S x S) through the base dataset, its ``--bad-images`` policy included."""

    def __init__(self, base: Dataset, crop: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base, self.crop = base, crop
        self.samples = base.samples  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        jpeg = EncodedPairs._jpeg(self, index)  # type: ignore[arg-type]
        if jpeg is None:
            return self.crop(self.base[index][0]), index
        return torch.frombuffer(bytearray(jpeg[0]), dtype=torch.uint8), index

    def host_crop(self, index: int) -> torch.Tensor:
        """Item ``index`` decoded and cropped on the host (a file the device decoder refused)."""
        return self.crop(self.base[index][0])


def collate_encoded_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:class:`EncodedImages` items as one batch: the payloads as a list, index int64 B."""
    return [item[0] for item in batch], torch.tensor([item[1] for item in batch], dtype=torch.long)


def resize_shorter(height: int, width: int, shorter: int) -> tuple[int, int]:
    """torchvision's ``Resize(shorter)`` output size of a ``height`` x ``width`` image (the shorter side to
    ``shorter``, the longer one scaled and truncated)."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def decode_centre_crops(payloads: Sequence[torch.Tensor], size: int, device: torch.device | str,
                        host: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The E-step's centre crops of an :func:`collate_encoded_images` batch on ``device``: uint8 B x 3 x size x size.
    JPEG payloads are decoded in one ``decode_jpeg`` call, then each is resized as ``Resize(round(size * 256 /
    224))`` and centre-cropped as ``CenterCrop(size)`` (torchvision's tensor ops, antialiased bilinear: within
    1/255 of the PIL eval transform); payloads the workers cropped are copied; a JPEG the device refuses goes to
    ``host(b)``."""
    device = torch.device(device)
    wait_for_queued_work(device)
    jpeg = [k for k, p in enumerate(payloads) if p.dim() == 1]
    images = dict(zip(jpeg, _device_images([payloads[k] for k in jpeg], device))) if jpeg else {}
    shorter = int(round(size * 256 / 224))
    crops = torch.empty(len(payloads), 3, size, size, dtype=torch.uint8, device=device)
    for b, payload in enumerate(payloads):
        img = images.get(b)
        if b not in images:
            crops[b] = payload.to(device, non_blocking=True)
        elif img is None or img.dim() != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 1:
            crops[b] = host(b).to(device, non_blocking=True)
        else:
            resized = F2.resize(img, list(resize_shorter(img.shape[1], img.shape[2], shorter)), antialias=True)
            crops[b] = F2.center_crop(resized, [size, size])
    return crops
