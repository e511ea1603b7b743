"""Seeded train/validation splits (the search never looks at the test set)."""
from __future__ import annotations

from typing import TypeVar

import torch

from .dataset import ArrayDataset, ImageFolder
from .registry import canonical_name

D = TypeVar("D", ArrayDataset, ImageFolder)

_VAL_SIZE = {"cifar10": 10_000, "cifar100": 10_000, "tiny-imagenet": 10_000,
             "fashion-mnist": 10_000}
SYNTHETIC_VAL_FRACTION = 0.2


def default_val_size(name: str, num_samples: int | None = None) -> int:
    """Validation size used by the search: 10,000 for CIFAR, Tiny-ImageNet and Fashion-MNIST
    (CIFAR 40k/10k, Tiny-ImageNet 90k/10k); 20% of ``num_samples`` for ``synthetic``."""
    cname = canonical_name(name)
    if cname in _VAL_SIZE:
        return _VAL_SIZE[cname]
    if num_samples is None:
        raise ValueError(f"default_val_size({cname!r}) is a fraction: pass num_samples")
    return max(1, int(round(SYNTHETIC_VAL_FRACTION * num_samples)))


def train_val_split(ds: D, val_size: int, seed: int) -> tuple[D, D]:
    """Split ``ds`` into (train, val) by a seeded random choice of ``val_size`` samples.

    Both parts keep the original sample order; the same seed always gives the same split.
    """
    n = len(ds)
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for a dataset of {n} samples; "
                         f"got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, _ = perm[:val_size].sort()
    train_idx, _ = perm[val_size:].sort()
    return ds.subset(train_idx), ds.subset(val_idx)
