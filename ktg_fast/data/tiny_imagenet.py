"""Tiny-ImageNet (200 classes, 64x64) from its standard folder layout.

``tiny-imagenet-200/wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` with
``val/val_annotations.txt``. The labelled val folder serves as the test split. Class ids follow
the sorted wnids (torchvision's ImageFolder convention).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .dataset import ArrayDataset, DatasetNotFoundError, ImageFolder

IMAGE_SHAPE = (3, 64, 64)
_HOW = ("download tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip), unzip "
        "it under the data root, and pass --data-root (or set KTG_DATA_ROOT)")


def _base(root: Path) -> Path:
    for c in (root / "tiny-imagenet-200", root):
        if (c / "wnids.txt").is_file():
            return c
    raise DatasetNotFoundError("tiny-imagenet", [root / "tiny-imagenet-200" / "wnids.txt",
                                                 root / "wnids.txt"], _HOW)


def tiny_imagenet_folder(root: Path, split: str) -> ImageFolder:
    """The split as an :class:`ImageFolder` (file paths and labels; nothing decoded)."""
    base = _base(root)
    wnids = sorted(w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip())
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        if not (base / "train").is_dir():
            raise DatasetNotFoundError("tiny-imagenet", [base / "train"], _HOW)
        return ImageFolder.from_class_dirs(base / "train", IMAGE_SHAPE, classes=wnids,
                                           name="tiny-imagenet")
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetNotFoundError("tiny-imagenet", [ann], _HOW)
    files, labels = [], []
    for line_no, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise ValueError(f"{ann}:{line_no}: expected '<file>\\t<wnid>...' with a wnid from "
                             f"wnids.txt; got {line!r}")
        files.append(str(base / "val" / "images" / parts[0]))
        labels.append(index[parts[1]])
    missing = [f for f in files[:1] + files[-1:] if not Path(f).is_file()]
    if missing:
        raise DatasetNotFoundError("tiny-imagenet", missing, _HOW)
    return ImageFolder(files, torch.tensor(labels, dtype=torch.int64), len(wnids), "tiny-imagenet",
                       IMAGE_SHAPE)


def load_tiny_imagenet(root: Path, split: str, num_threads: int | None = None) -> ArrayDataset:
    """Decode a Tiny-ImageNet split into memory with PIL (uint8, (N, 3, 64, 64))."""
    return tiny_imagenet_folder(root, split).decode(num_threads)
