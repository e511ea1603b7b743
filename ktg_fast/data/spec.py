"""What data a run uses: the dataset, its splits and subsets (one home for the split seed too)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["DataSpec", "SPLIT_SEED"]


@dataclass
class DataSpec:
    """Which data a run trains and evaluates on.

    ``val_size > 0`` holds out that many training images (seeded split, the
    same for every run) as the validation split; ``test`` evaluates on the
    test split too (a search never does).  ``train_subset`` keeps only the
    first N training images after the split (for quick runs).
    """

    dataset: str
    root: Optional[str] = None
    val_size: int = 0
    test: bool = True
    train_subset: Optional[int] = None
    eval_subset: Optional[int] = None
    loader: str = "auto"
    download: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag of a bad size (a subset of 0 or fewer images)."""
        for flag, value in (("--train-subset", self.train_subset), ("--eval-subset", self.eval_subset)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} must be a whole number >= 1 (leave it out to use every image), "
                                 f"got {value!r}")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) or self.val_size < 0:
            raise ValueError(f"--val-size must be a whole number >= 0, got {self.val_size!r}")


# Seed of the train/validation split: fixed, so teachers, searches and
# retraining all see the same split whatever their training seed.
SPLIT_SEED = 0
