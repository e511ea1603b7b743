"""Teachers of frozen auxiliary nodes: found in the teacher folder or pre-trained once, on demand.

A frozen node loads a label-only network trained on the search's own training
split (``<teachers>/<dataset>-val<N>/<model>.pt``).  When it is missing, the
first worker that needs it trains it under an exclusive file lock; workers that
need the same teacher wait on the lock and then load it, so no two workers ever
train the same teacher.  A worker that dies while training releases the lock
and the next one resumes the teacher's run from its last epoch.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from .. import teachers as teacher_lib  # teacher_lib.pretrain_teacher is looked up per call (tests replace it)
from ..data import canonical_name
from ..graph import Graph
from ..io import atomic_write_json
from ..locks import FolderBusyError, locked_file
from ..nodes import TeacherNotFoundError, teacher_path
from ..report import plural
from ..trainer import NonFiniteLossError
from .config import SearchConfig

__all__ = ["ensure_teachers", "missing_teachers", "teacher_file", "TeacherPretrainError"]

log = logging.getLogger("ktg_fast.search")


class TeacherPretrainError(RuntimeError):
    """Pre-training a frozen node's teacher failed (not the graph's fault); the message says which and why."""


def _failed_marker(dest: Path) -> Path:
    """``<teacher>.pt.failed.json``: a teacher whose pre-training diverged, so nobody trains it again."""
    return dest.with_name(dest.name + ".failed.json")


def teacher_file(cfg: SearchConfig, model: str) -> Path:
    return teacher_path(cfg.teacher_dir(), canonical_name(cfg.dataset), model, cfg.resolved_val_size())


def pretrain_hint(cfg: SearchConfig, model: str) -> str:
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
        TeacherPretrainError: pre-training a teacher failed, now or earlier (each teacher is tried once:
            a diverged one leaves ``<teacher>.pt.failed.json``).
    """
    paths = []
    for t in graph.frozen:
        model = graph.nodes[t - 1].model
        dest = teacher_file(cfg, model)
        if not dest.is_file():
            if not cfg.pretrain:
                raise TeacherNotFoundError(
                    f"no teacher {model} for {cfg.dataset} at {dest} and --no-pretrain is set: run "
                    f"`{pretrain_hint(cfg, model)}`, or drop --no-pretrain to train it on demand")
            _pretrain_locked(model, dest, cfg, node=t, device=device, step=step, on_wait=on_wait)
        paths.append(dest)
    return paths


def _pretrain_failure(cfg: SearchConfig, model: str, node: int, dest: Path, reason: str) -> TeacherPretrainError:
    marker = _failed_marker(dest)
    return TeacherPretrainError(
        f"pre-training teacher {model} (frozen node {node} of this graph) failed: {reason}. The search stops "
        f"here; no graph is charged for it. Pre-train the teacher yourself with other settings (e.g. a lower "
        f"--lr): `{pretrain_hint(cfg, model)}`, or start the search again with other settings in another --out"
        + (f"; to try this teacher again as it is, delete {marker}" if marker.is_file() else ""))


def _teacher_reason(e: BaseException) -> str:
    """The trainer's message about the teacher's own one-node run, told in the search's terms.

    Inside that run the teacher is "node 1"; that number means another node in the trial's graph, so it is
    dropped, and so are clauses that name files that do not exist.
    """
    text = re.sub(r"\s*in node \d+ \([^)]*\)", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
    return existing_clauses(text) or type(e).__name__


def existing_clauses(text: str) -> str:
    """``text`` without its '; '-separated clauses that name a file or folder that does not exist."""
    return "; ".join(c for c in text.split("; ")
                     if all(Path(w).exists() for w in re.findall(r"[\w.~-]*(?:/[\w.-]+)+", c)))


def _pretrain_locked(model: str, dest: Path, cfg: SearchConfig, *, node: int, device: str, step: str,
                     on_wait: Optional[Callable[[str], None]]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    marker = _failed_marker(dest)
    lock_path = dest.with_name(dest.name + ".lock")
    with locked_file(lock_path, wait_s=0) as got:
        if not got:
            msg = f"waiting for another worker to pre-train teacher {model} ({dest})"
            log.info(msg)
            if on_wait:
                on_wait(msg)
    t0 = time.monotonic()
    with locked_file(lock_path):
        if time.monotonic() - t0 > 1:
            log.info("teacher %s ready after %.0f s", model, time.monotonic() - t0)
        if dest.is_file():  # trained by the worker we waited for
            return
        if marker.is_file():  # diverged before: not again
            reason = json.loads(marker.read_text()).get("reason", "see this file")
            raise _pretrain_failure(cfg, model, node, dest, f"{reason} (recorded in {marker})")
        epochs = cfg.resolved_teacher_epochs()
        log.info("pre-training teacher %s for %s on the search split (%s) -> %s",
                 model, cfg.dataset, plural(epochs, "epoch"), dest)
        t0 = time.monotonic()
        try:
            teacher_lib.pretrain_teacher(model, cfg.data_spec(),
                                         cfg.train_config(seed=0, epochs=cfg.resolved_teacher_epochs()),
                                         teacher_dir=cfg.teacher_dir(), device=device, step=step, progress=False)
        except KeyboardInterrupt:
            raise
        except FolderBusyError as e:  # python -m ktg_fast.pretrain trains this very teacher now
            raise TeacherPretrainError(f"teacher {model} (frozen node {node} of this graph) is being pre-trained by "
                                       f"another command: {e}. The search stops here; no graph is charged for it. "
                                       "Start the search again when that command has finished: it then uses the "
                                       "teacher written there") from None
        except NonFiniteLossError as e:  # deterministic: record it so that no worker trains it again
            reason = _teacher_reason(e)
            atomic_write_json(marker, {"model": model, "reason": reason, "epochs": cfg.resolved_teacher_epochs(),
                                       "lr": cfg.lr})
            raise _pretrain_failure(cfg, model, node, dest, reason) from e
        except Exception as e:  # out of memory, missing data...: the next run tries again
            raise _pretrain_failure(cfg, model, node, dest, f"{type(e).__name__}: {_teacher_reason(e)}") from e
        log.info("teacher %s trained in %.0f s", model, time.monotonic() - t0)
