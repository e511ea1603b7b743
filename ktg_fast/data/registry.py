"""Dataset names, their shapes, and the front door that loads a split by name."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cifar import load_cifar
from .dataset import ArrayDataset, DatasetNotFoundError, ImageFolder
from .fashion_mnist import load_fashion_mnist
from .synthetic import make_synthetic
from .tiny_imagenet import load_tiny_imagenet, tiny_imagenet_folder

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """What is known about a dataset without loading it."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int


_SPECS = {s.name: s for s in (
    DatasetSpec("cifar10", 3, 32, 10),
    DatasetSpec("cifar100", 3, 32, 100),
    DatasetSpec("fashion-mnist", 1, 28, 10),
    DatasetSpec("tiny-imagenet", 3, 64, 200),
    DatasetSpec("synthetic", 3, 32, 10),
)}
# Spellings compared with '-', '_' and case removed.
_ALIASES = {n.replace("-", ""): n for n in _SPECS}


def available_datasets() -> list[str]:
    """Canonical names accepted by :func:`load_dataset`."""
    return list(_SPECS)


def canonical_name(name: str) -> str:
    """Map a spelling (``fashion_mnist``, ``FashionMNIST``, ``CIFAR-10``...) to the canonical name."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {available_datasets()}")
    return _ALIASES[key]


def default_root() -> Path:
    """The data root: ``$KTG_DATA_ROOT`` if set, else ``./data``."""
    return Path(os.environ.get("KTG_DATA_ROOT") or "data")


def dataset_info(name: str, **kw: Any) -> tuple[int, int, int]:
    """(in_channels, image_size, num_classes) of a dataset, without loading it.

    For ``synthetic``, ``num_classes`` and ``image_shape`` keywords override the defaults.
    """
    spec = _SPECS[canonical_name(name)]
    if spec.name == "synthetic":
        c, h, w = kw.get("image_shape", (spec.in_channels, spec.image_size, spec.image_size))
        if h != w:
            raise ValueError(f"synthetic: dataset_info reports square images; got {h}x{w}")
        return c, h, kw.get("num_classes", spec.num_classes)
    return spec.in_channels, spec.image_size, spec.num_classes


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r} (for a validation split "
                         "use train_val_split on the train split)")


def load_dataset(name: str, root: str | os.PathLike | None = None, *, split: str = "train",
                 download: bool = False, **kw: Any) -> ArrayDataset:
    """Load a whole split into memory as an :class:`ArrayDataset` (uint8 images, int64 labels).

    Args:
        name: ``cifar10``, ``cifar100``, ``fashion-mnist``, ``tiny-imagenet`` or ``synthetic``
            (``fashion_mnist``/``fashionmnist`` and similar spellings are accepted).
        root: data root; default :func:`default_root`.
        split: ``train`` or ``test`` (Tiny-ImageNet's test split is its labelled val folder).
        download: fetch CIFAR / Fashion-MNIST through torchvision when missing (needs internet).
        **kw: for ``synthetic``: ``num_classes``, ``size``, ``image_shape``, ``seed``, ``noise``;
            for ``tiny-imagenet``: ``num_threads`` for decoding.

    Raises:
        DatasetNotFoundError: the files are missing; the message lists the paths tried.
    """
    cname = canonical_name(name)
    _check_split(split)
    base = Path(root) if root is not None else default_root()
    allowed = {"synthetic": {"num_classes", "size", "image_shape", "seed", "noise"},
               "tiny-imagenet": {"num_threads"}}.get(cname, set())
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(f"load_dataset({cname!r}) got unexpected keyword(s) {sorted(unknown)}; "
                        f"accepted: {sorted(allowed)}")
    if root is not None and cname != "synthetic" and not download and not base.expanduser().exists():
        # Not found there, the loaders would go on to other places (Debian's package): say so instead.
        fetch = ", or pass --download to fetch the files into it" if cname != "tiny-imagenet" else ""
        raise DatasetNotFoundError(cname, [base], f"the data root {base} does not exist: fix --data-root, or "
                                   f"leave it out (the default: $KTG_DATA_ROOT, else ./data){fetch}")
    if cname in ("cifar10", "cifar100"):
        return load_cifar(cname, base, split, download)
    if cname == "fashion-mnist":
        return load_fashion_mnist(base, split, download)
    if cname == "tiny-imagenet":
        return load_tiny_imagenet(base, split, **kw)
    return make_synthetic(split=split, **kw)


def load_image_folder(name: str, root: str | os.PathLike | None = None, *,
                      split: str = "train") -> ImageFolder:
    """A split as image files (for DALI's file reader); only image-folder datasets have one."""
    cname = canonical_name(name)
    _check_split(split)
    if cname != "tiny-imagenet":
        raise ValueError(f"{cname} is stored as arrays, not image files; use load_dataset "
                         "(image folders: tiny-imagenet, or ImageFolder.from_class_dirs)")
    return tiny_imagenet_folder(Path(root) if root is not None else default_root(), split)
