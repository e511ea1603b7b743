"""Pre-training a label-only teacher as library code (``python -m ktg_fast.pretrain`` and the search call it).

A frozen graph node with ``checkpoint: pretrained`` loads
``<teachers>/<dataset>[-val<N>]/<model>.pt`` (:func:`ktg_fast.nodes.teacher_path`, where nodes
find their checkpoints); :func:`pretrain_teacher` writes it.
"""
from __future__ import annotations

import filecmp
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from .data import canonical_name
from .data.spec import DataSpec
from .graph import preset
from .locks import folder_lock
from .nodes import default_teacher_dir, describe_checkpoint, teacher_path
from .recipe import TrainConfig
from .distributed import DistContext
from .trainer import Trainer

__all__ = ["TeacherExistsError", "pretrain_teacher", "refuse_replacing"]


class TeacherExistsError(FileExistsError):
    """Pre-training would replace a teacher checkpoint that another run wrote (every graph with
    ``checkpoint: pretrained`` loads that file)."""


def pretrain_teacher(model: str, data: DataSpec, cfg: TrainConfig, *, teacher_dir: Optional[str | os.PathLike] = None,
                     device: str = "auto", step: str = "auto", progress: bool = True,
                     work_dir: Optional[str | os.PathLike] = None,
                     compile_cache: Optional[str | os.PathLike] = None, dist: Optional[DistContext] = None,
                     replace: bool = False) -> Path:
    """Train ``model`` on the labels alone and write it to the teacher folder; return its path.

    The run itself (resumable) lives in ``work_dir`` (default: beside the
    checkpoint, ``<model>.run/``); the checkpoint is written atomically at the end
    (by rank 0 of a data-parallel run, ``dist``).  A teacher file already there is
    replaced only by the run that wrote it (a rerun writes the same file) or with ``replace``.

    Raises:
        TeacherExistsError: the teacher file exists, this run did not write it, and ``replace`` is False
            (checked before any training).
        ktg_fast.locks.FolderBusyError: another process pre-trains into ``work_dir`` now.
    """
    teacher_dir = default_teacher_dir() if teacher_dir is None else Path(teacher_dir)
    dest = teacher_path(teacher_dir, canonical_name(data.dataset), model, data.val_size)
    run_dir = Path(work_dir) if work_dir else dest.with_suffix(".run")
    writes = dist is None or dist.is_main  # (the other ranks of a data-parallel run write nothing)
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(run_dir, what=f"pre-training of teacher {model}", else_=None) if writes else nullcontext():
        if writes and not replace:
            refuse_replacing(dest, run_dir, model)
        return _pretrain(model, data, cfg, dest, run_dir, device=device, step=step, progress=progress,
                         compile_cache=compile_cache, dist=dist)


def _finished_node(run_dir: Path) -> Optional[Path]:
    """The trained teacher of a finished pre-training run in ``run_dir`` (None if it has not finished)."""
    if not (run_dir / "final.json").is_file():
        return None
    return next(iter(sorted((run_dir / "nodes").glob("node1_*.pt"))), None)


def refuse_replacing(dest: Path, run_dir: Path, model: str) -> None:
    """Raise :class:`TeacherExistsError` if writing ``dest`` from ``run_dir`` would replace another run's teacher
    (a file the finished run in ``run_dir`` did not write)."""
    if not dest.is_file():
        return
    mine = _finished_node(run_dir)
    if mine is not None and filecmp.cmp(mine, dest, shallow=False):
        return  # this run wrote it: a rerun rewrites the same teacher
    raise TeacherExistsError(
        f"teacher {dest} already exists ({describe_checkpoint(dest)}) and was not written by the run in {run_dir}: "
        f"every graph with `checkpoint: pretrained` loads it. Pass --replace to train a new {model} in its place, "
        "or --teachers DIR to keep both")


def _pretrain(model: str, data: DataSpec, cfg: TrainConfig, dest: Path, run_dir: Path, *, device: str, step: str,
              progress: bool, compile_cache: Optional[str | os.PathLike], dist: Optional[DistContext]) -> Path:
    if _finished_node(run_dir) is None or (run_dir / "checkpoint.pt").is_file():  # (a finished run's checkpoint may be gone)
        trainer = Trainer(preset("vanilla", model=model), data, cfg, run_dir, device=device, step=step,
                          progress=progress, compile_cache=compile_cache, dist=dist)
        # Resume what a killed pretraining left; a first run has nothing to resume and says nothing about it.
        trainer.run(resume=(run_dir / "checkpoint.pt").is_file() or (run_dir / "final.json").is_file())
    if dist is not None and not dist.is_main:
        return dest
    src = _finished_node(run_dir)
    tmp = dest.with_name(dest.name + ".tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest
