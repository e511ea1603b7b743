"""Fashion-MNIST from idx files (gzipped or not): Debian's package or torchvision's layout."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch

from .dataset import ArrayDataset, DatasetNotFoundError

log = logging.getLogger("ktg_fast")

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) of unsigned bytes into an array of its stated shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: idx element type 0x{raw[2]:02x} is not supported (only uint8)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {tuple(dims)} but holds {len(raw) - start} bytes"
                         " (truncated file?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(tuple(dims))


def _find(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def candidate_dirs(root: Path) -> list[Path]:
    """Folders searched, in order: torchvision's layout, common names, root, Debian's package."""
    return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root / "fashion_mnist", root,
            DEBIAN_DIR]


def load_fashion_mnist(root: Path, split: str, download: bool = False) -> ArrayDataset:
    """Load a Fashion-MNIST split as uint8 (N, 1, 28, 28)."""
    stems = [f"{_PREFIX[split]}-images-idx3-ubyte", f"{_PREFIX[split]}-labels-idx1-ubyte"]
    dirs = candidate_dirs(root)

    def find() -> tuple[Path, Path] | None:
        for d in dirs:
            found = [_find(d, s) for s in stems]
            if all(found):
                return found[0], found[1]  # type: ignore[return-value]
        return None

    found = find()
    error = ""
    if found is None and download:
        try:
            import torchvision  # local: only --download needs it, and its failure is reported as the download's

            torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
        except Exception as e:  # offline and the like: report with the paths tried
            error = f" (--download failed: {type(e).__name__}: {e})"
        found = find()
    if found is None:
        raise DatasetNotFoundError(
            "fashion-mnist", [d / f"{s}[.gz]" for d in dirs for s in stems],
            "`apt-get install dataset-fashion-mnist` (Debian), pass --data-root to a folder with "
            f"the idx files, or pass --download (download=True from Python) when online{error}")
    log.info("fashion-mnist %s: %s", split, found[0].parent)  # which copy: the root's or Debian's package
    images = read_idx(found[0])
    labels = read_idx(found[1]).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{found[0]}: images {images.shape} and labels {labels.shape} do not match")
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels), 10,
                        "fashion-mnist")
