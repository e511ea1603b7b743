"""The two dataset containers: decoded arrays in memory, and image files on disk."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for.

    The message lists every path that was tried and how to get the data.
    """

    def __init__(self, name: str, looked_in: Sequence[str | Path], how_to_get: str) -> None:
        self.dataset = name
        self.looked_in = [str(p) for p in looked_in]
        lines = [f"dataset {name!r} not found; looked in:"]
        lines += [f"  - {p}" for p in self.looked_in]
        lines.append(f"To get it: {how_to_get}")
        super().__init__("\n".join(lines))


def _as_index(indices: Sequence[int] | Tensor | np.ndarray, n: int) -> Tensor:
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"subset indices must lie in [0, {n}); got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


@dataclass
class ArrayDataset:
    """A whole split decoded into memory.

    Attributes:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,) with values in [0, num_classes).
        num_classes: number of classes.
        name: the dataset's canonical name (e.g. ``"cifar100"``).
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be a uint8 tensor (N, C, H, W); got "
                             f"{self.images.dtype} with shape {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: labels must be int64 of shape ({self.images.shape[0]},); "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.labels.numel() and (int(self.labels.min()) < 0
                                    or int(self.labels.max()) >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {self.num_classes})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> "ArrayDataset":
        """The samples at ``indices``, in that order (copies the selected images)."""
        idx = _as_index(indices, len(self))
        return ArrayDataset(self.images[idx], self.labels[idx], self.num_classes, self.name)


def decode_image(path: str | Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Decode one image file to uint8 (C, H, W), checking it has ``image_shape``."""
    c, h, w = image_shape
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB" if c == 3 else "L"), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (h, w, c):
        raise ValueError(f"{path}: expected a {w}x{h} image with {c} channel(s), got "
                         f"{arr.shape[1]}x{arr.shape[0]}; only fixed-size image folders are supported")
    return arr.transpose(2, 0, 1)


@dataclass
class ImageFolder:
    """A split kept as image files (for DALI's file reader), not yet decoded.

    Attributes:
        files: one path per sample.
        labels: int64 tensor (N,).
        num_classes: number of classes.
        name: the dataset's canonical name.
        image_shape: (C, H, W) every image must have.
    """

    files: list[str]
    labels: Tensor
    num_classes: int
    name: str
    image_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.shape != (len(self.files),):
            raise ValueError(f"{self.name}: {len(self.files)} files but labels of shape "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> "ImageFolder":
        """The samples at ``indices``, in that order."""
        idx = _as_index(indices, len(self))
        return ImageFolder([self.files[i] for i in idx.tolist()], self.labels[idx],
                           self.num_classes, self.name, self.image_shape)

    def decode(self, num_threads: int | None = None) -> ArrayDataset:
        """Decode every file with PIL into an :class:`ArrayDataset` (threads: PIL frees the GIL)."""
        c, h, w = self.image_shape
        images = np.empty((len(self), c, h, w), dtype=np.uint8)

        def work(i: int) -> None:
            images[i] = decode_image(self.files[i], self.image_shape)

        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            list(pool.map(work, range(len(self)), chunksize=256))
        return ArrayDataset(torch.from_numpy(images), self.labels.clone(), self.num_classes, self.name)

    @classmethod
    def from_class_dirs(cls, root: str | Path, image_shape: tuple[int, int, int] = (3, 64, 64),
                        classes: Sequence[str] | None = None, name: str = "folder",
                        extensions: tuple[str, ...] = (".jpeg", ".jpg", ".png")) -> "ImageFolder":
        """Scan the ImageNet layout ``root/<class>/**/<image>``; class ids follow sorted names.

        ``classes`` fixes the class list (and order); images under other folders are ignored.
        """
        root = Path(root)
        if not root.is_dir():
            raise DatasetNotFoundError(name, [root], "pass the folder holding one sub-folder per class")
        names = sorted(classes) if classes is not None else sorted(
            d.name for d in root.iterdir() if d.is_dir())
        files: list[str] = []
        labels: list[int] = []
        for label, cname in enumerate(names):
            found = sorted(str(p) for p in (root / cname).rglob("*")
                           if p.suffix.lower() in extensions)
            files += found
            labels += [label] * len(found)
        if not files:
            raise DatasetNotFoundError(name, [root], f"put images ({', '.join(extensions)}) in "
                                       "one sub-folder per class")
        return cls(files, torch.tensor(labels, dtype=torch.int64), len(names), name, image_shape)
