"""What every loader shares: the seeded per-epoch plan (sample order, crop offsets, flips) and the
epoch bookkeeping (``set_epoch``, ``fill_``, batches per epoch).

The plan is drawn on the CPU from a generator seeded by (seed, epoch), so the tensor, DALI and
torch loaders visit the same samples in the same order with the same augmentation on any
device, and ``set_epoch(e)`` reproduces epoch e exactly (the trainer's exact resume). Drawing it
costs one randperm per epoch; the device loaders upload it once per epoch, asynchronously.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

Normalize = tuple[Sequence[float], Sequence[float]]


@dataclass(frozen=True)
class CropFlip:
    """Forced augmentation per dataset sample: offsets (N, 2) in [0, 2*pad], flips (N,) bool.

    Loaders given one use these instead of random draws (tests, loader equivalence).
    """

    offsets: Tensor
    flips: Tensor

    def __post_init__(self) -> None:
        if self.offsets.dim() != 2 or self.offsets.shape[1] != 2 or \
                self.flips.shape != (self.offsets.shape[0],):
            raise ValueError("CropFlip needs offsets (N, 2) and flips (N,); got "
                             f"{tuple(self.offsets.shape)} and {tuple(self.flips.shape)}")


@dataclass(frozen=True)
class EpochPlan:
    """One epoch: ``order`` (N,) sample indices in visiting order; per position ``offsets``
    (N, 2) and ``flips`` (N,) (None without augmentation); all on the CPU."""

    epoch: int
    order: Tensor
    offsets: Tensor | None
    flips: Tensor | None
    batch_size: int
    num_batches: int

    def bounds(self, k: int) -> tuple[int, int]:
        """[start, stop) positions of batch k in ``order``."""
        start = k * self.batch_size
        return start, min(start + self.batch_size, len(self.order))


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch); nearby pairs give unrelated streams."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0; got seed={seed}, epoch={epoch}")
    a, b = np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


def check_batch_split(batch_size: int, world: int) -> None:
    """Refuse a global training batch smaller than the number of data-parallel processes.

    Raises:
        ValueError: ``batch_size < world``, naming the smallest ``--batch-size`` that works.
    """
    if batch_size < world:
        raise ValueError(f"the global batch of {batch_size} cannot be split over {world} processes: "
                         f"raise --batch-size to at least {world}")


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch: floor(n / B) when dropping the last incomplete batch, else ceil."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s part of ``n`` items split into ``world`` contiguous parts
    (sizes differ by at most one; the first ones are the smaller)."""
    return n * rank // world, n * (rank + 1) // world


def shard_plan(plan: EpochPlan, rank: int, world: int, *, train: bool) -> EpochPlan:
    """Rank ``rank``'s part of ``plan`` (data-parallel training over ``world`` processes).

    Training: each global batch is split into ``world`` contiguous slices and the rank keeps its
    own (same slice size in every batch, since the last incomplete batch is dropped), with the
    global plan's crops and flips, so the ranks together see exactly the batches and augmentation
    of one process.  Evaluation: the rank keeps one contiguous part of the samples, every sample
    counted once over the ranks (no padding, unlike ``DistributedSampler``).
    """
    if world == 1:
        return plan
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if train:  # full batches only (the last incomplete one is dropped)
        lo, hi = shard_bounds(plan.batch_size, rank, world)
        pos = (torch.arange(plan.num_batches)[:, None] * plan.batch_size + torch.arange(lo, hi)[None, :]).flatten()
        pick = (lambda t: None if t is None else t[pos])
        return EpochPlan(plan.epoch, plan.order[pos], pick(plan.offsets), pick(plan.flips), hi - lo,
                         plan.num_batches)
    lo, hi = shard_bounds(len(plan.order), rank, world)
    return EpochPlan(plan.epoch, plan.order[lo:hi], None, None, plan.batch_size,
                     num_batches(hi - lo, plan.batch_size, False))


def make_epoch_plan(n: int, batch_size: int, *, train: bool, seed: int, epoch: int,
                    augment: bool, pad: int = 4, crop_flip: CropFlip | None = None) -> EpochPlan:
    """The plan of one epoch: training shuffles and drops the last incomplete batch; evaluation
    keeps the natural order and every sample. Augmentation only when ``train and augment``."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g) if train else torch.arange(n)
    offsets = flips = None
    if train and augment:
        if crop_flip is not None:
            if crop_flip.offsets.shape[0] != n:
                raise ValueError(f"crop_flip covers {crop_flip.offsets.shape[0]} samples, the "
                                 f"dataset has {n}")
            offsets = crop_flip.offsets.to(torch.int64)[order]
            flips = crop_flip.flips.to(torch.bool)[order]
        else:
            offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
            flips = torch.randint(0, 2, (n,), generator=g).bool()
    return EpochPlan(epoch, order, offsets, flips, batch_size, num_batches(n, batch_size, train))


def parse_normalize(normalize: Normalize | None, channels: int) -> tuple[list[float], list[float]] | None:
    """Check (mean, std) for pixels in [0, 1]; one value per channel, or one for all."""
    if normalize is None:
        return None
    try:
        mean, std = ([float(v) for v in part] for part in normalize)
    except (TypeError, ValueError):
        raise ValueError(f"normalize must be (mean, std) sequences; got {normalize!r}") from None
    mean = mean * channels if len(mean) == 1 else mean
    std = std * channels if len(std) == 1 else std
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"normalize needs {channels} mean and {channels} positive std values "
                         f"(or one of each); got mean={mean}, std={std}")
    return mean, std


Batch = tuple[Tensor, Tensor]


class EpochLoader(ABC):
    """Base of all loaders: iterating yields one epoch of (x float32 (B, C, H, W), y int64 (B,)).

    Each ``iter()`` runs the epoch set by :meth:`set_epoch` (default: the one after the last
    started), so calling ``set_epoch(e)`` before every epoch and never calling it both work.
    Subclasses implement :meth:`_iter_plan`.
    """

    def __init__(self, n: int, batch_size: int, *, train: bool, seed: int, augment: bool,
                 pad: int, crop_flip: CropFlip | None, out: Batch | None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if train and n < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training samples: with the "
                             "last incomplete batch dropped an epoch would be empty; lower it")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n = n
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.augment = augment and train
        self.pad = pad
        self.crop_flip = crop_flip
        self.out = out
        self._next = (0, 0)
        self.shard = (0, 1)  # (rank, world): see set_shard
        self._fill_iter: Iterator[Batch] | None = None
        self._fill_out: list[Tensor] = []
        # set by subclasses: what a batch looks like, for checking static buffers
        self.image_shape: tuple[int, int, int] = (0, 0, 0)
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        """Batches per epoch (of this rank's shard: the same count on every rank for training)."""
        if self.train or self.shard[1] == 1:
            return num_batches(self.n, self.batch_size, self.train)
        lo, hi = shard_bounds(self.n, *self.shard)
        return num_batches(hi - lo, self.batch_size, False)

    def set_shard(self, rank: int, world: int) -> None:
        """Deliver only rank ``rank``'s part of every epoch, of ``world`` data-parallel processes
        (:func:`shard_plan`): ``batch_size`` stays the global batch; :attr:`local_batch_size` is this
        rank's slice of it."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank {rank} of {world}")
        if self.train:
            check_batch_split(self.batch_size, world)
        self.shard = (rank, world)
        self._fill_iter = None

    @property
    def local_batch_size(self) -> int:
        """Samples per batch this rank delivers (training: its slice of the global batch)."""
        if not self.train:
            return self.batch_size
        lo, hi = shard_bounds(self.batch_size, *self.shard)
        return hi - lo

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` will run."""
        return self._next[0]

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        """Make the next ``iter()`` run ``epoch``, starting at batch ``batch`` (mid-epoch resume)."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"batch must be in [0, {len(self)}], got {batch}")
        epoch_seed(self.seed, epoch)  # validates epoch >= 0
        self._next = (epoch, batch)
        self._fill_iter = None

    def plan(self, epoch: int) -> EpochPlan:
        """The sample order and augmentation of ``epoch`` (same for every loader kind)."""
        plan = make_epoch_plan(self.n, self.batch_size, train=self.train, seed=self.seed,
                               epoch=epoch, augment=self.augment, pad=self.pad,
                               crop_flip=self.crop_flip)
        return shard_plan(plan, *self.shard, train=self.train)

    def __iter__(self) -> Iterator[Batch]:
        # Lazy: the epoch is taken when the first batch is drawn, not when iter() is called, so an
        # iterator made and dropped unread (tqdm.asyncio's __init__ calls iter() once more) takes none.
        epoch, start = self._next
        self._next = (epoch + 1, 0)
        yield from self._iter_plan(self.plan(epoch), start, self.out)

    def fill_(self, x_buf: Tensor, y_buf: Tensor) -> int:
        """Write the next batch into preallocated ``x_buf`` (B, C, H, W) and ``y_buf`` (B,).

        Returns the number of samples written (fewer than B only for evaluation's last batch),
        or 0 once the epoch is over; the call after that starts the next epoch.
        """
        self._check_out((x_buf, y_buf), self.local_batch_size, self.image_shape, self.device)
        # The running epoch reads its buffers from this list at every batch, so a call may
        # pass different buffers than the previous one.
        self._fill_out[:] = [x_buf, y_buf]
        if self._fill_iter is None:
            epoch, start = self._next
            self._next = (epoch + 1, 0)
            self._fill_iter = self._iter_plan(self.plan(epoch), start, self._fill_out)
        for x, _ in self._fill_iter:
            return int(x.shape[0])
        self._fill_iter = None
        return 0

    @abstractmethod
    def _iter_plan(self, plan: EpochPlan, start: int,
                   out: Batch | list[Tensor] | None) -> Iterator[Batch]:
        """Yield batches ``start..`` of ``plan``; with ``out``, write into ``out[0]``/``out[1]``
        (read anew at every batch) and yield views of them."""

    @staticmethod
    def _check_out(out: Batch | list[Tensor] | None, batch_size: int, shape: tuple[int, int, int],
                   device: torch.device) -> None:
        if out is None:
            return
        x_buf, y_buf = out
        want = (batch_size, *shape)
        if tuple(x_buf.shape) != want or x_buf.dtype != torch.float32 or x_buf.device != device:
            raise ValueError(f"x buffer must be float32 {want} on {device}; got {x_buf.dtype} "
                             f"{tuple(x_buf.shape)} on {x_buf.device}")
        if tuple(y_buf.shape) != (batch_size,) or y_buf.dtype != torch.int64 or y_buf.device != device:
            raise ValueError(f"y buffer must be int64 ({batch_size},) on {device}; got {y_buf.dtype} "
                             f"{tuple(y_buf.shape)} on {y_buf.device}")
