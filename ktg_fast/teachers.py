"""Teachers: where label-only teachers live, and their pre-training as library code.

A frozen graph node with ``checkpoint: pretrained`` loads
``<teachers>/<dataset>[-val<N>]/<model>.pt``; :func:`pretrain_teacher` writes it
(``python -m ktg_fast.pretrain`` and the search call it).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from .data import canonical_name
from .data.spec import DataSpec
from .graph import preset
from .models import canonical_model_name
from .recipe import TrainConfig

__all__ = ["TeacherNotFoundError", "default_teacher_dir", "teacher_path", "pretrain_teacher"]


class TeacherNotFoundError(FileNotFoundError):
    """A frozen node's checkpoint is missing; the message says how to make it."""


def default_teacher_dir() -> Path:
    """``$KTG_TEACHERS`` or ./teachers: where ``python -m ktg_fast.pretrain`` writes and graphs look."""
    return Path(os.environ.get("KTG_TEACHERS", "teachers"))


def teacher_path(teacher_dir: str | os.PathLike, dataset: str, model: str, val_size: int = 0) -> Path:
    """Checkpoint path of a label-only teacher.

    Teachers for a search are trained on the search's training split (the
    validation images held out), so the split is part of the name.
    """
    tag = dataset if val_size == 0 else f"{dataset}-val{val_size}"
    return Path(teacher_dir) / tag / f"{canonical_model_name(model)}.pt"


def pretrain_teacher(model: str, data: DataSpec, cfg: TrainConfig, *, teacher_dir: Optional[str | os.PathLike] = None,
                     device: str = "auto", step: str = "auto", progress: bool = True,
                     work_dir: Optional[str | os.PathLike] = None) -> Path:
    """Train ``model`` on the labels alone and write it to the teacher folder; return its path.

    The run itself (resumable) lives in ``work_dir`` (default: beside the
    checkpoint, ``<model>.run/``); the checkpoint is written atomically at the end.
    """
    from .trainer import Trainer  # here, not at the top: the trainer builds nodes, which find teachers here

    teacher_dir = default_teacher_dir() if teacher_dir is None else Path(teacher_dir)
    dest = teacher_path(teacher_dir, canonical_name(data.dataset), model, data.val_size)
    run_dir = Path(work_dir) if work_dir else dest.with_suffix(".run")
    trainer = Trainer(preset("vanilla", model=model), data, cfg, run_dir, device=device, step=step,
                      progress=progress)
    trainer.run(resume=True)
    src = next((run_dir / "nodes").glob("node1_*.pt"))
    tmp = dest.with_name(dest.name + ".tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest
