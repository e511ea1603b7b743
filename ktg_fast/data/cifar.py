"""CIFAR-10 / CIFAR-100 from torchvision's on-disk layout (pickled batches)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .dataset import ArrayDataset, DatasetNotFoundError

# name -> (folder, train files, test files, label key, classes)
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    # The official files are Python pickles (as torchvision reads them); only load trusted data.
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"{path}: not a CIFAR batch (missing key {e.args[0]!r})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data (N, 3072) and N labels; got {data.shape} "
                         f"and {len(labels)} labels")
    return data, labels


def _download(name: str, root: Path, train: bool) -> None:
    import torchvision  # local: only --download needs it, and its failure is reported as the download's

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    cls(str(root), train=train, download=True)


def load_cifar(name: str, root: Path, split: str, download: bool = False) -> ArrayDataset:
    """Load a CIFAR split into memory; ``root`` holds ``cifar-10-batches-py`` or ``cifar-100-python``.

    ``root`` may also be that folder itself. With ``download=True`` a missing copy is fetched by
    torchvision (needs internet).
    """
    folder, train_files, test_files, label_key, num_classes = _LAYOUT[name]
    files = train_files if split == "train" else test_files
    candidates = [root / folder, root]

    def find() -> Path | None:
        return next((c for c in candidates if all((c / f).is_file() for f in files)), None)

    found = find()
    download_error = ""
    if found is None and download:
        try:
            _download(name, root, split == "train")
        except Exception as e:  # offline, disk full, ...: report it with the paths tried
            download_error = f" (--download failed: {type(e).__name__}: {e})"
        found = find()
    if found is None:
        raise DatasetNotFoundError(
            name, [c / f for c in candidates for f in files],
            f"pass --download (download=True from Python) when online, or put torchvision's "
            f"'{folder}' folder under the data root (--data-root or KTG_DATA_ROOT){download_error}")
    parts = [_read_batch(found / f, label_key) for f in files]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    return ArrayDataset(torch.from_numpy(data), torch.from_numpy(labels), num_classes, name)
