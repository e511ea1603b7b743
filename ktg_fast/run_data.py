"""A run's data: the training loader and the evaluation loaders a :class:`~ktg_fast.trainer.Trainer` uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import canonical_name, load_dataset, load_image_folder, make_loader, train_val_split
from .data.spec import SPLIT_SEED, DataSpec

__all__ = ["RunData", "load_run_data", "EVAL_BATCH"]

EVAL_BATCH = 1000  # images per evaluation batch


@dataclass
class RunData:
    """The loaders of a run and what the nets must be built for."""

    train_loader: Any
    eval_loaders: dict[str, Any]  # "val" and/or "test"
    loader_kind: str  # the loader kind chosen (every loader of the run is of this kind)
    num_classes: int
    in_channels: int


def load_run_data(data: DataSpec, *, batch_size: int, seed: int, augment: bool, device: torch.device) -> RunData:
    """Load ``data``'s splits (validation split, subsets) and build their loaders on ``device``.

    The training loader shuffles and augments with ``seed`` (per epoch); the evaluation loaders are
    of the kind the training loader chose, unshuffled and unaugmented.

    Raises:
        ValueError: fewer training images than one batch.
    """
    # Image-folder datasets stay files so DALI can decode them; other loaders decode them into memory.
    if canonical_name(data.dataset) == "tiny-imagenet" and data.loader in ("auto", "dali"):
        def load(split):
            return load_image_folder(data.dataset, data.root, split=split)
    else:
        def load(split):
            return load_dataset(data.dataset, data.root, split=split, download=data.download)
    train = load("train")
    val = None
    if data.val_size:
        train, val = train_val_split(train, data.val_size, seed=SPLIT_SEED)
    if data.train_subset is not None:
        train = train.subset(range(min(data.train_subset, len(train))))
    test = load("test") if data.test else None
    if data.eval_subset is not None:
        val = val.subset(range(min(data.eval_subset, len(val)))) if val is not None else None
        test = test.subset(range(min(data.eval_subset, len(test)))) if test is not None else None
    if len(train) < batch_size:
        raise ValueError(f"{len(train)} training images are fewer than one batch of {batch_size}")
    train_loader, chosen, _ = make_loader(data.loader, train, batch_size, train=True, seed=seed, device=device,
                                          augment=augment)
    eval_loaders = {}
    for name, ds in (("val", val), ("test", test)):
        if ds is not None:
            eval_loaders[name], _, _ = make_loader(chosen, ds, EVAL_BATCH, train=False, seed=0, device=device,
                                                   augment=False, reason="as the training loader")
    return RunData(train_loader, eval_loaders, chosen, train.num_classes, train.image_shape[0])
