"""A seeded, learnable synthetic image dataset for tests and smoke runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import ArrayDataset

DEFAULT_SIZE = {"train": 1000, "test": 200}


def make_synthetic(num_classes: int = 10, size: int | None = None,
                   image_shape: tuple[int, int, int] = (3, 32, 32), *, seed: int = 0,
                   split: str = "train", noise: float = 32.0) -> ArrayDataset:
    """Images = a smooth class prototype plus Gaussian pixel noise, as uint8 (N, C, H, W).

    Prototypes depend on ``seed`` only, so the train and test splits share them; the noise and
    the label order depend on ``split`` too. Prototypes are left-right symmetric and smooth, so
    random crops and flips keep a class recognisable and a few SGD steps raise accuracy.
    """
    if num_classes < 2:
        raise ValueError(f"synthetic: num_classes must be >= 2, got {num_classes}")
    size = DEFAULT_SIZE[split] if size is None else int(size)
    if size < 1:
        raise ValueError(f"synthetic: size must be >= 1, got {size}")
    c, h, w = image_shape
    if min(c, h, w) < 1:
        raise ValueError(f"synthetic: image_shape must be positive (C, H, W), got {image_shape}")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, c, 4, 4, generator=g)
    proto = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    proto = (proto + proto.flip(-1)) / 2  # flip-invariant, so flip augmentation keeps the class
    gs = torch.Generator().manual_seed(seed * 2 + (1 if split == "train" else 2))
    labels = torch.arange(size) % num_classes
    labels = labels[torch.randperm(size, generator=gs)]
    pixels = 40.0 + 175.0 * proto[labels] + noise * torch.randn(size, c, h, w, generator=gs)
    images = pixels.round().clamp_(0, 255).to(torch.uint8)
    return ArrayDataset(images, labels.to(torch.int64), num_classes, "synthetic")
