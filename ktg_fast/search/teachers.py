"""Teachers of frozen auxiliary nodes: found in the teacher folder or pre-trained once, on demand.

A frozen node loads a label-only network trained on the search's own training
split (``<teachers>/<dataset>-val<N>/<model>.pt``).  When it is missing, the
first worker that needs it trains it under an exclusive file lock; workers that
need the same teacher wait on the lock and then load it, so no two workers ever
train the same teacher.  A worker that dies while training releases the lock
and the next one resumes the teacher's run from its last epoch.
"""
from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..graph import Graph
from ..nodes import TeacherNotFoundError, teacher_path
from .config import SearchConfig

__all__ = ["ensure_teachers", "missing_teachers", "teacher_file"]

log = logging.getLogger("ktg_fast.search")


def teacher_file(cfg: SearchConfig, model: str) -> Path:
    from ..data import canonical_name

    return teacher_path(cfg.teacher_dir(), canonical_name(cfg.dataset), model, cfg.resolved_val_size())


def _pretrain_hint(cfg: SearchConfig, model: str) -> str:
    from ..data import canonical_name

    parts = [f"python -m ktg_fast.pretrain --model {model} --dataset {canonical_name(cfg.dataset)}",
             f"--val-size {cfg.resolved_val_size()}", f"--teachers {cfg.teacher_dir()}",
             f"--epochs {cfg.resolved_teacher_epochs()}"]
    if cfg.train_subset:
        parts.append(f"--train-subset {cfg.train_subset}")
    return " ".join(parts)


def missing_teachers(cfg: SearchConfig, models: Iterable[str]) -> list[str]:
    """Models among ``models`` whose teacher checkpoint is not in the teacher folder."""
    return [m for m in dict.fromkeys(models) if not teacher_file(cfg, m).is_file()]


def ensure_teachers(graph: Graph, cfg: SearchConfig, *, device: str, step: str = "auto",
                    on_wait: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Make sure every frozen node of ``graph`` has its teacher; return their paths.

    Raises:
        TeacherNotFoundError: a teacher is missing and ``cfg.pretrain`` is off.
    """
    paths = []
    for t in graph.frozen:
        model = graph.nodes[t - 1].model
        dest = teacher_file(cfg, model)
        if not dest.is_file():
            if not cfg.pretrain:
                raise TeacherNotFoundError(
                    f"no teacher {model} for {cfg.dataset} at {dest} and --no-pretrain is set: run "
                    f"`{_pretrain_hint(cfg, model)}`, or drop --no-pretrain to train it on demand")
            _pretrain_locked(model, dest, cfg, device=device, step=step, on_wait=on_wait)
        paths.append(dest)
    return paths


def _pretrain_locked(model: str, dest: Path, cfg: SearchConfig, *, device: str, step: str,
                     on_wait: Optional[Callable[[str], None]]) -> None:
    from ..pretrain import pretrain_teacher

    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.with_name(dest.name + ".lock")
    with open(lock_path, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            msg = f"waiting for another worker to pre-train teacher {model} ({dest})"
            log.info(msg)
            if on_wait:
                on_wait(msg)
            t0 = time.monotonic()
            fcntl.lockf(f, fcntl.LOCK_EX)
            log.info("teacher %s ready after %.0f s", model, time.monotonic() - t0)
        try:
            if dest.is_file():  # trained by the worker we waited for
                return
            log.info("pre-training teacher %s for %s on the search split (%d epochs) -> %s",
                     model, cfg.dataset, cfg.resolved_teacher_epochs(), dest)
            t0 = time.monotonic()
            pretrain_teacher(model, cfg.data_spec(), cfg.train_config(seed=0, epochs=cfg.resolved_teacher_epochs()),
                             teacher_dir=cfg.teacher_dir(), device=device, step=step, progress=False)
            log.info("teacher %s trained in %.0f s", model, time.monotonic() - t0)
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)
