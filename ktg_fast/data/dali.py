"""NVIDIA DALI loader (extra ``dali``): the same epochs as :class:`BatchLoader`, built by DALI.

In-memory arrays go through an ``external_source`` fed with numpy batches; image folders through
DALI's file reader with JPEG decoding on the GPU ("mixed") or the CPU. Augmentation is
``fn.slice`` with ``out_of_bounds_policy="reflect_101"`` (numpy's "reflect": edge not repeated)
at the plan's crop anchors, then ``fn.crop_mirror_normalize`` with the plan's flips. The plan
(order, offsets, flips) is the shared one of :mod:`ktg_fast.data.plan`, fed to DALI, so for the
same seed and epoch all loaders give the same batches. Without a GPU (``device_id=None``) every
operator runs on the CPU. One pipeline is built per epoch: cheap next to an epoch, and it makes
the epoch's end, a mid-epoch start and an abandoned epoch exact without DALI's reader state.
"""
from __future__ import annotations

import importlib
import os
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .dataset import ArrayDataset, ImageFolder
from ..device import resolve_device
from .plan import Batch, CropFlip, EpochLoader, EpochPlan, Normalize, parse_normalize

MIN_DALI_VERSION = (1, 30)
INSTALL_HINT = "pip install 'ktg_fast[dali]' (installs nvidia-dali-cuda130)"


class DaliUnavailableError(ImportError):
    """DALI is missing or too old for the DALI loader."""


def dali_status() -> tuple[bool, str]:
    """(usable, explanation): whether ``nvidia.dali`` imports and is recent enough."""
    try:
        dali = importlib.import_module("nvidia.dali")
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"NVIDIA DALI is not installed ({type(e).__name__}: {e}); {INSTALL_HINT}"
    try:
        version = tuple(int(p) for p in dali.__version__.split(".")[:2])
    except ValueError:
        version = MIN_DALI_VERSION  # a dev build: assume recent
    if version < MIN_DALI_VERSION:
        return False, (f"NVIDIA DALI {dali.__version__} is too old (need >= "
                       f"{'.'.join(map(str, MIN_DALI_VERSION))}); {INSTALL_HINT}")
    return True, f"NVIDIA DALI {dali.__version__}"


def require_dali() -> None:
    """Raise :class:`DaliUnavailableError` naming the extra to install when DALI is unusable."""
    ok, msg = dali_status()
    if not ok:
        raise DaliUnavailableError(msg)


class _ArraySource:
    """external_source feed of one epoch of in-memory images: [images HWC] (+ anchors, mirrors)."""

    def __init__(self, hwc: np.ndarray, plan: EpochPlan, start: int, pad: int) -> None:
        self.hwc, self.plan, self.start, self.pad = hwc, plan, start, pad

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for k in range(self.start, self.plan.num_batches):
            s, e = self.plan.bounds(k)
            batch = [self.hwc[self.plan.order[s:e].numpy()]]
            yield batch + _aug_args(self.plan, s, e, self.pad)


class _AugSource:
    """external_source feed of one epoch's crop anchors and mirror flags (file-reader pipelines)."""

    def __init__(self, plan: EpochPlan, start: int, pad: int) -> None:
        self.plan, self.start, self.pad = plan, start, pad

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for k in range(self.start, self.plan.num_batches):
            yield _aug_args(self.plan, *self.plan.bounds(k), self.pad)


def _aug_args(plan: EpochPlan, s: int, e: int, pad: int) -> list[np.ndarray]:
    if plan.offsets is None:
        return []
    # slice anchors are in unpadded coordinates: a crop at padded offset o starts at o - pad
    anchors = (plan.offsets[s:e] - pad).to(torch.int32).numpy()
    mirrors = plan.flips[s:e].to(torch.int32).numpy()
    return [anchors, mirrors]


class DaliLoader(EpochLoader):
    """Batches built by a DALI pipeline, handed over as torch tensors on ``device``.

    Same arguments and epoch semantics as :class:`~ktg_fast.data.loader.BatchLoader`; ``source``
    may also be an :class:`ImageFolder`, read and decoded by DALI. ``device="cpu"`` runs DALI's
    CPU-only mode. ``num_threads`` sets DALI's CPU worker threads.
    """

    def __init__(self, source: ArrayDataset | ImageFolder, batch_size: int, *, train: bool,
                 seed: int, device: torch.device | str = "cpu", augment: bool = True,
                 normalize: Normalize | None = None, pad: int = 4,
                 crop_flip: CropFlip | None = None, out: Batch | None = None,
                 num_threads: int | None = None, prefetch: int = 2) -> None:
        require_dali()
        super().__init__(len(source), batch_size, train=train, seed=seed, augment=augment,
                         pad=pad, crop_flip=crop_flip, out=out)
        self.device = resolve_device(device)
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self.prefetch = prefetch
        if isinstance(source, ArrayDataset):
            self.image_shape = source.image_shape
            self._hwc = source.images.permute(0, 2, 3, 1).contiguous().numpy()
            self._files = None
        elif isinstance(source, ImageFolder):
            self.image_shape = tuple(source.image_shape)
            self._hwc = None
            self._files = list(source.files)
            if self.image_shape[0] not in (1, 3):
                raise ValueError(f"image folders must be RGB or grey; got {self.image_shape}")
        else:
            raise TypeError(f"DaliLoader needs an ArrayDataset or ImageFolder; got "
                            f"{type(source).__name__}")
        c, h, w = self.image_shape
        if self.augment and not 0 <= pad < min(h, w):
            raise ValueError(f"pad must be in [0, {min(h, w) - 1}] for {h}x{w} images; got {pad}")
        self._check_out(out, batch_size, self.image_shape, self.device)
        self.labels = source.labels.to(self.device)
        mean, std = parse_normalize(normalize, c) or ([0.0] * c, [1.0] * c)
        # crop_mirror_normalize sees uint8 pixels: scale (mean, std) from [0, 1] to [0, 255]
        self._mean = [255.0 * m for m in mean]
        self._std = [255.0 * s for s in std]

    def _build(self, plan: EpochPlan, start: int):
        from nvidia.dali import fn, types  # local: optional dependency (pip install 'ktg_fast[dali]')
        from nvidia.dali.pipeline import Pipeline  # local: optional dependency (pip install 'ktg_fast[dali]')

        gpu = self.device_id is not None
        aug = plan.offsets is not None
        c, h, w = self.image_shape
        pipe = Pipeline(batch_size=plan.batch_size, num_threads=self.num_threads,
                        device_id=self.device_id, seed=self.seed,
                        prefetch_queue_depth=self.prefetch)
        with pipe:
            if self._hwc is not None:
                outs = fn.external_source(source=_ArraySource(self._hwc, plan, start, self.pad),
                                          num_outputs=3 if aug else 1, batch=True,
                                          layout=["HWC", "", ""][:3 if aug else 1])
                images = outs[0].gpu() if gpu else outs[0]
                anchors, mirrors = (outs[1], outs[2]) if aug else (None, None)
            else:
                first = start * plan.batch_size
                last = plan.num_batches * plan.batch_size if self.train else len(plan.order)
                files = [self._files[i] for i in plan.order[first:last].tolist()]
                # pad_last_batch: an evaluation epoch's last batch is padded to full size by
                # repeating the last file; the padding is cut off after the copy.
                jpegs, _ = fn.readers.file(files=files, labels=list(range(len(files))),
                                           random_shuffle=False, pad_last_batch=True,
                                           name="reader")
                images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                           output_type=types.RGB if c == 3 else types.GRAY)
                anchors = mirrors = None
                if aug:
                    anchors, mirrors = fn.external_source(source=_AugSource(plan, start, self.pad),
                                                          num_outputs=2, batch=True)
            if aug:
                images = fn.slice(images, start=anchors, shape=[h, w], axis_names="HW",
                                  out_of_bounds_policy="reflect_101")
            images = fn.crop_mirror_normalize(images, mirror=mirrors if aug else 0,
                                              mean=self._mean, std=self._std,
                                              dtype=types.FLOAT, output_layout="CHW")
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _iter_plan(self, plan: EpochPlan, start: int, out: Batch | list[Tensor] | None) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import feed_ndarray  # local: optional dependency (pip install 'ktg_fast[dali]')

        self._check_out(out, self.local_batch_size, self.image_shape, self.device)
        if start >= plan.num_batches:
            return
        dev = self.device
        order_dev = plan.order.to(dev, non_blocking=True)
        stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
        pipe = self._build(plan, start)
        try:
            for k in range(start, plan.num_batches):
                s, e = plan.bounds(k)
                b = e - s
                (images,) = pipe.run()
                dense = images.as_tensor()
                n_out = dense.shape()[0]
                if out is not None and n_out == b:
                    x = out[0][:b]
                    feed_ndarray(dense, x, cuda_stream=stream)
                else:
                    x = torch.empty((n_out, *self.image_shape), dtype=torch.float32, device=dev)
                    feed_ndarray(dense, x, cuda_stream=stream)
                    x = x[:b]  # cut the reader's padding of the last evaluation batch
                    if out is not None:
                        x = out[0][:b].copy_(x)
                y = self.labels[order_dev[s:e]]
                if out is not None:
                    y = out[1][:b].copy_(y, non_blocking=True)
                yield x, y
        finally:
            del pipe  # frees DALI's threads and buffers even when the epoch is abandoned
