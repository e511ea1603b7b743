"""A search worker that trains up to K trials at once as one packed computation (``--pack K``).

The worker fills K slots with admitted trials (``study.ask()`` and the same
admission as :class:`~.worker.Worker`), trains them together one epoch at a time
(:class:`~ktg_fast.pack_trainer.PackTrainer`: their nodes of one architecture are
one vmapped group), and after every epoch reports each trial to the pruner on
its own: a pruned, failed or finished trial leaves its slot, which is refilled
with the next trial at that trial's epoch 0 before the next epoch.

Each slot keeps its own heartbeat.  A packed trial's batches are those of the
pack's data seed from the pack epoch it joined at; both are stored in the trial
(``data_seed``, ``data_offset`` user attributes), so a killed worker's trials are
re-run alone on the same batches, or resumed from their own checkpoints
(``trials/<n>/checkpoint.pt``, written by the pack in a lone run's format), and
end exactly where the pack would have taken them.
"""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
import torch
from optuna.trial import FrozenTrial

from ..graph import Graph
from ..io import atomic_write_text
from ..pack_trainer import Member, PackTrainer
from .config import SearchConfig
from .ledger import is_retry, root_of
from .teachers import TeacherPretrainError, ensure_teachers
from .trial_files import resume_from, trial_dir
from .trial_hooks import EpochReporter, Heartbeat
from .worker import Worker, _is_oom

__all__ = ["PackWorker"]

log = logging.getLogger("ktg_fast.search")


@dataclass(eq=False)
class _Slot:
    """A trial in the pack: its Optuna handle, folder, pruning reporter, heartbeat and pack member."""

    trial: optuna.Trial
    graph: Graph
    out: Path
    info: dict
    t0: float
    reporter: EpochReporter
    heartbeat: Heartbeat
    member: Optional[Member] = None


class _NodeSaver:
    """What :class:`EpochReporter` calls to save the target's weights when it prunes (a lone run's
    ``Trainer.save_node``), for a packed member."""

    def __init__(self, pack: PackTrainer, member: Member):
        self.pack, self.member = pack, member

    def save_node(self, t: int, **meta: Any) -> Path:
        return self.pack.save_node(self.member, t, **meta)


class PackWorker(Worker):
    """Run trials of the study in ``cfg``, ``pack`` at a time, until it holds ``--trials`` finished trials.

    Args:
        cfg: the search settings.
        worker_id: index of this worker on its machine.
        pack: K, the most trials trained at once (at least 1).

    A retry of a packed trial runs alone (a lone :class:`~ktg_fast.trainer.Trainer`) on the
    batches recorded in its attributes, resuming the lost trial's checkpoint when it is on this
    machine: it ends where its pack would have taken it.
    """

    def __init__(self, cfg: SearchConfig, worker_id: int = 0, *, pack: int):
        super().__init__(cfg, worker_id)
        if pack < 1:
            raise ValueError(f"pack must be at least 1, got {pack}")
        self.k = pack
        self.slots: list[_Slot] = []
        self.pack: Optional[PackTrainer] = None
        self._pending: Optional[Heartbeat] = None  # the heartbeat of the trial being admitted

    # -------------------------------------------------------------- loop
    def _loop(self, poll: float) -> None:
        try:
            while True:
                book = self._books(poll)
                if not self.slots and (book.complete or self._stop):
                    break
                while not self._stop and len(self.slots) < self.k and book.should_ask():
                    self._waiting = False
                    self._one_trial()
                    book = self.ledger()
                if self.slots:
                    self._epoch()
                elif not book.complete:
                    self._wait(book, poll)  # every trial of the study is taken: wait for running or stale ones
        except BaseException:
            self._give_back_all()
            raise
        if self.pack is not None:
            r, b = self.pack.refills, self.pack.rebuilds
            log.info("worker %d: %d trial%s joined the running pack in the place of a trial that ended, reusing "
                     "its step; the step was built %d time%s (once at the start, again for a newcomer whose models "
                     "had no free places, or to shrink the pack at the search's tail)",
                     self.worker_id, r, "" if r == 1 else "s", b, "" if b == 1 else "s")

    def _one_trial(self) -> None:
        trial = self.study.ask()
        hb = Heartbeat(self.storage, trial._trial_id, float(self.storage.get_heartbeat_interval() or 60))
        hb.__enter__()
        self._pending = hb
        try:
            self._admit_and_train(trial)  # -> _train: joins the pack (keeps hb), or runs alone, or is rejected
        except KeyboardInterrupt:
            self._interrupted(trial)
            raise
        finally:
            if self._pending is not None:  # not taken by a slot
                self._pending = None
                hb.__exit__(None, None, None)

    # ----------------------------------------------------------- joining
    def _train(self, trial: optuna.Trial, me: FrozenTrial, graph: Any) -> None:
        cfg = self.cfg
        out = trial_dir(cfg.out, trial.number)
        if is_retry(me):
            resumed = resume_from(cfg.out, cfg.epochs, me, out)
            if resumed or "data_seed" in me.user_attrs:
                # A lost trial whose batches were recorded: alone, on those batches (resuming its checkpoint when
                # it is on this machine), so that it ends as it would have in its pack.
                return super()._train(trial, me, graph, resumed=resumed)
        t0 = time.monotonic()
        pack = self._pack(int(me.user_attrs.get("seed", cfg.seed + root_of(me))))
        data = {"data_seed": pack.data_seed, "data_offset": pack.epoch}
        seed, out, info = self._start(trial, me, graph, resumed=False, data=data)
        slot = _Slot(trial, graph, out, info, t0, EpochReporter(trial, graph.target, cfg.epochs, out),
                     self._pending)
        try:
            ensure_teachers(graph, cfg, device=self.device, step=cfg.step)
            slot.member = self.pack.add(trial.number, graph, self._recipe(seed, info), out)
        except TeacherPretrainError as e:
            self.trained += 1
            self._teacher_failed(trial, out, info, t0, e)
        except Exception as e:
            self.trained += 1
            self._aborted(trial, out, e)
        slot.reporter.trainer = _NodeSaver(self.pack, slot.member)
        self._pending = None  # the slot keeps the heartbeat
        self.slots.append(slot)
        log.info("trial %d joins the pack at pack epoch %d (%d of %d slots)", trial.number, data["data_offset"],
                 len(self.slots), self.k)

    def _pack(self, seed: int) -> PackTrainer:
        """The worker's pack, made on first use with the first trial's ``seed`` as its data seed (so a pack
        that starts with one trial gives it the batches it would see alone)."""
        if self.pack is None:
            cfg = self.cfg
            self.pack = PackTrainer(cfg.data_spec(), batch_size=cfg.batch_size, augment=cfg.augment,
                                    data_seed=seed, device=self.device, step=cfg.step,
                                    teacher_dir=cfg.teacher_dir(), precision=cfg.precision,
                                    compile_cache=cfg.compile_cache_folder())
        return self.pack

    # ------------------------------------------------------------- epoch
    def _epoch(self) -> None:
        """One pack epoch; every slot's trial is reported, and leaves when pruned, failed or finished."""
        try:
            results = self.pack.run_epoch()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if _is_oom(e):
                return self._pack_out_of_memory(e)
            trace = traceback.format_exc()
            for s in self.slots:
                atomic_write_text(s.out / "error.txt", trace)
            first = self.slots[0]
            for s in self.slots[1:]:
                self._reject(s.trial, f"aborted: {type(e).__name__}: {e}")
            self._close_all()
            self._aborted(first.trial, first.out, e)
        by_member = {id(s.member): s for s in self.slots}
        for res in results:
            s = by_member[id(res.member)]
            if res.failure is not None:
                self._non_finite(s.trial, s.out, s.info, s.t0, res.failure)
                self._leave(s)
                continue
            try:
                s.reporter(res.record)
            except optuna.TrialPruned as e:
                self._pruned(s.trial, s.out, s.info, s.t0, s.reporter, e)
                self._leave(s)
                continue
            if res.member.done:
                final = self.pack.finish(res.member, res.record)
                self._complete(s.trial, s.out, s.info, s.t0, final, s.graph.target)
                self._leave(s)

    def _leave(self, s: _Slot) -> None:
        self.pack.remove(s.member)
        self.slots.remove(s)
        s.heartbeat.__exit__(None, None, None)
        self.trained += 1

    def _pack_out_of_memory(self, e: BaseException) -> None:
        """K trials do not fit: hand them back (they are re-run) and go on with half the slots; a single
        trial that does not fit fails as out of memory, as it would alone."""
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        if len(self.slots) == 1:
            s = self.slots[0]
            self._out_of_memory(s.trial, s.out, s.info, s.t0, e)
            return self._leave(s)
        k = max(1, len(self.slots) // 2)
        log.warning("a pack of %d trials ran out of memory on %s; its trials are re-queued and this worker goes "
                    "on with --pack %d", len(self.slots), self.device, k)
        self.k = k
        self._give_back_all()
        self.pack = None

    # ---------------------------------------------------------- cleanup
    def _give_back_all(self) -> None:
        """Interrupted (Ctrl-C, SIGTERM, an error): give every packed trial back for a rerun."""
        for s in list(self.slots):
            self._interrupted(s.trial)
        self._close_all()

    def _close_all(self) -> None:
        for s in self.slots:
            with contextlib.suppress(Exception):
                s.heartbeat.__exit__(None, None, None)
        self.slots.clear()
        if self.pack is not None:
            for m in list(self.pack.members):
                self.pack.remove(m)
