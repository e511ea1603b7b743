"""The tensor loader: a whole in-memory split, batched, augmented and converted with tensor ops.

One class serves both the "tensor" path (the uint8 split held on the GPU; each batch selected
and augmented in a single indexing op on the device) and the plain "torch" path (the split in
host memory, pinned when the target is a GPU; each batch selected on the host, copied
asynchronously, then augmented on the target device). On a CPU both are the same code.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from ..device import resolve_device
from .augment import crop_flip_grids, gather_crops
from .dataset import ArrayDataset
from .plan import Batch, CropFlip, EpochLoader, EpochPlan, Normalize, parse_normalize

STORAGES = ("auto", "device", "host")
# Keep at least half the free GPU memory for the networks when choosing storage="auto".
_FIT_FRACTION = 0.5


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fit in half the free memory of ``device`` (always true on CPU)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= _FIT_FRACTION * free


def to_float(u8: Tensor, mean: Tensor | None, std: Tensor | None, out: Tensor | None = None) -> Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1], then ``(x - mean) / std`` if given; into ``out``."""
    # one fused pass: the uint8 / float division promotes to float32 and writes into ``x``
    x = out if out is not None else torch.empty(u8.shape, dtype=torch.float32, device=u8.device)
    torch.div(u8, 255.0, out=x)
    if mean is not None:
        x.sub_(mean).div_(std)
    return x


def _upload(t: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to ``device`` without blocking the host (via pinned memory)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class BatchLoader(EpochLoader):
    """Seeded batches of an :class:`ArrayDataset`: (x float32 (B, C, H, W) in [0, 1] or
    normalised, y int64 (B,)), both on ``device``.

    Training (``train=True``): a fresh seeded permutation per epoch, the last incomplete batch
    dropped, and (if ``augment``) 4-pixel reflection pad + random crop + random horizontal flip
    per sample. Evaluation: the natural order, every sample, no augmentation.

    Args:
        ds: the split, in memory.
        batch_size: samples per batch.
        train: training or evaluation semantics (see above).
        seed: seeds the order and augmentation of every epoch (with the epoch number).
        device: where batches are delivered.
        augment: crop/flip augmentation (training only).
        normalize: optional (mean, std) per channel for pixels in [0, 1].
        storage: ``"device"`` keeps the uint8 split on ``device``; ``"host"`` keeps it in host
            memory (pinned for a CUDA device); ``"auto"``: device if it takes at most half the
            free GPU memory, else host.
        pad: reflection padding of the random crop.
        crop_flip: force the crop offsets and flips per sample (tests).
        out: static (x, y) buffers to fill and yield instead of fresh tensors.
    """

    def __init__(self, ds: ArrayDataset, batch_size: int, *, train: bool, seed: int,
                 device: torch.device | str = "cpu", augment: bool = True,
                 normalize: Normalize | None = None, storage: str = "host", pad: int = 4,
                 crop_flip: CropFlip | None = None, out: Batch | None = None) -> None:
        super().__init__(len(ds), batch_size, train=train, seed=seed, augment=augment, pad=pad,
                         crop_flip=crop_flip, out=out)
        if not isinstance(ds, ArrayDataset):
            raise TypeError(f"BatchLoader needs an ArrayDataset; got {type(ds).__name__} "
                            "(decode an ImageFolder with .decode(), or use the DALI loader)")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.device = resolve_device(device)
        self.image_shape = ds.image_shape
        c, h, w = self.image_shape
        if self.augment and not 0 <= pad < min(h, w):
            raise ValueError(f"pad must be in [0, {min(h, w) - 1}] for {h}x{w} images; got {pad}")
        self._check_out(out, batch_size, self.image_shape, self.device)
        on_gpu = self.device.type == "cuda"
        if storage == "auto":
            storage = "device" if fits_on_device(ds.images.numel(), self.device) else "host"
        self.storage = storage
        if storage == "device" or not on_gpu:
            self.images = ds.images.to(self.device).contiguous()
        else:
            self.images = ds.images.contiguous().pin_memory()
        self.labels = ds.labels.to(self.device)
        norm = parse_normalize(normalize, c)
        self.mean = self.std = None
        if norm is not None:
            self.mean = torch.tensor(norm[0], device=self.device).view(1, c, 1, 1)
            self.std = torch.tensor(norm[1], device=self.device).view(1, c, 1, 1)

    def _iter_plan(self, plan: EpochPlan, start: int, out: Batch | list[Tensor] | None) -> Iterator[Batch]:
        self._check_out(out, self.local_batch_size, self.image_shape, self.device)
        dev = self.device
        on_device = self.images.device == dev
        pinned = dev.type == "cuda"
        # One asynchronous upload of the epoch's plan; per batch only device-side slicing and
        # indexing follow, so filling the trainer's buffers never waits for the device.
        order_dev = _upload(plan.order, dev)
        if plan.offsets is not None:
            offsets, flips = _upload(plan.offsets, dev), _upload(plan.flips, dev)
        _, h, w = self.image_shape
        for k in range(start, plan.num_batches):
            s, e = plan.bounds(k)
            if on_device:
                src, samples = self.images, order_dev[s:e]
            else:  # host storage: select on the host, copy the uint8 batch asynchronously
                staging = torch.empty((e - s, *self.image_shape), dtype=torch.uint8,
                                      pin_memory=pinned)
                torch.index_select(self.images, 0, plan.order[s:e], out=staging)
                src, samples = staging.to(dev, non_blocking=True), None
            if plan.offsets is not None:
                rows, cols = crop_flip_grids(offsets[s:e], flips[s:e], h, w, self.pad)
                u8 = gather_crops(src, rows, cols, samples)
            else:
                u8 = src[samples] if samples is not None else src
            y = self.labels[order_dev[s:e]]
            if out is None:
                yield to_float(u8, self.mean, self.std), y
            else:
                b = e - s
                x_buf, y_buf = out[0][:b], out[1][:b]
                to_float(u8, self.mean, self.std, out=x_buf)
                y_buf.copy_(y, non_blocking=True)
                yield x_buf, y_buf
