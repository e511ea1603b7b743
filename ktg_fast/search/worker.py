"""One search worker: ask a trial, admit it, train its graph with pruning, tell the result; repeat.

Many workers (processes on one machine, or machines sharing a PostgreSQL
storage) run this loop on the same study.  A trial's life:

1. ``study.ask()`` hands out a re-queued trial first, else a new one; its
   heartbeat starts at once.
2. Admission: a graph whose target would be frozen is rejected; under the
   study-wide lock, a graph already tried, or a trial beyond ``--trials``, is
   rejected too (see ``ledger.py``).  Rejected trials train nothing and do not
   count.
3. Missing teachers of frozen nodes are pre-trained (``teachers.py``); when that
   fails the trial is rejected (not counted) and the search stops, naming the teacher.
4. The graph trains on the train split; after every epoch the target's
   validation accuracy goes to the pruner, which may stop the trial.
5. The result is told: COMPLETE (value: the target's final validation
   accuracy), PRUNED, or FAIL with its reason (NaN, out of memory).

A worker killed mid-trial stops its heartbeat: after the grace period another
worker (or a rerun) fails the trial and re-queues it with the same graph and
seed; the retry resumes from the dead trial's last checkpoint when it runs on
the same machine.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..cli_common import Terminated
from ..trainer import NonFiniteLossError, Trainer
from .commands import replay_command
from .config import SearchConfig
from .ledger import ATTR_INTERRUPTED, ATTR_KEY, ATTR_REJECTED, Ledger, is_retry, retry_history, root_of
from .locks import admission_lock
from .space import FrozenTargetError
from .storage import open_storage
from .study import BUDGET_ATTR, load_search_study
from .teachers import TeacherPretrainError, ensure_teachers
from .trial_files import describe_graph, mark_interrupted, resume_from, start_trial_dir, trial_dir
from .outcomes import TrialOutcomes
from .trial_hooks import EpochReporter, Heartbeat

__all__ = ["Worker", "trial_dir"]

log = logging.getLogger("ktg_fast.search")


def raise_interrupt(signum: int, frame: Any) -> None:
    """A signal handler that stops like Ctrl-C (SIGTERM from schedulers: the trial is given back)."""
    raise Terminated(f"signal {signum}")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class Worker(TrialOutcomes):
    """Run trials of the study in ``cfg`` until it holds ``--trials`` finished trials.

    Args:
        cfg: the search settings (the study must exist; ``cli`` creates it).
        worker_id: index of this worker on its machine (picks its GPU when there are several).
    """

    def __init__(self, cfg: SearchConfig, worker_id: int = 0):
        self.cfg = cfg
        self.worker_id = worker_id
        self.space = cfg.space()
        self.host = socket.gethostname()
        self.trained = 0
        self._stop = False
        self._waiting = False  # in a wait already announced

    # ------------------------------------------------------------ set-up
    def _device(self) -> str:
        dev = self.cfg.device
        if dev in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return f"cuda:{self.worker_id % torch.cuda.device_count()}"
        return dev

    def _threads(self) -> None:
        n = self.cfg.cpu_threads
        if n is None and self.cfg.workers > 1:
            n = max(1, (os.cpu_count() or 1) // self.cfg.workers)
        if n:
            torch.set_num_threads(n)

    def _open(self) -> None:
        cfg = self.cfg
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # We run the heartbeat ourselves (see Heartbeat), which Optuna's ask() does not know.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = cfg.study_spec()
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
        self.storage = open_storage(cfg.storage_url(), heartbeat=spec["heartbeat"], grace=spec["grace"],
                                    retry_callback=self._stale)
        self.grace = spec["grace"]
        self.study = load_search_study(cfg, self.storage, seed=cfg.sampler_seed(self.worker_id))
        running = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if running and self.worker_id == 0:
            log.info("the study holds %d running trial%s (%s): other workers', or a killed run's, re-queued once "
                     "they have had no heartbeat for %d s (--grace)", len(running), "" if len(running) == 1 else "s",
                     ", ".join(map(str, running[:8])) + (", ..." if len(running) > 8 else ""), self.grace)

    def budget(self) -> int:
        return int(self.study.user_attrs.get(BUDGET_ATTR, self.cfg.trials))

    def _stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna failed ``trial`` for a stale heartbeat (its worker died): its folder says LOST, and it is
        re-queued (the retry resumes its checkpoint on this machine)."""
        mark_interrupted(trial_dir(self.cfg.out, trial.number), state="LOST",
                         reason=f"its worker stopped (no heartbeat for {self.grace} s); re-queued")
        log.warning("trial %d lost its worker (no heartbeat for %d s): re-queued", trial.number, self.grace)
        self.retry(study, trial)

    def _wait(self, book: Ledger, poll: float) -> None:
        """Sleep while every trial of the budget is taken; say why once per wait (a rerun after a kill waits
        for the dead run's trials to go stale, up to ``--grace`` seconds, and should not look hung)."""
        if not self._waiting:
            mine = len(getattr(self, "slots", ()))
            others = sum(1 for t in book.trials if t.state == TrialState.RUNNING) - mine
            if others > 0:
                log.info("waiting for %d running trial%s of other workers or of a run that was killed (those are "
                         "re-queued once they have had no heartbeat for %d s, --grace)", others,
                         "" if others == 1 else "s", self.grace)
            self._waiting = True
        time.sleep(poll)

    def ledger(self) -> Ledger:
        return Ledger(self.study.get_trials(deepcopy=False), self.budget())

    # -------------------------------------------------------------- loop
    def run(self) -> int:
        """Work until the study is complete; return the number of trials this worker trained."""
        self._threads()
        self.device = self._device()
        self._open()
        poll = max(0.2, min(self.cfg.poll_s, float(self.cfg.heartbeat)))
        prev = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, raise_interrupt)  # stopped politely: give the trial back, like Ctrl-C
        try:
            self._loop(poll)
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, prev)
        return self.trained

    def _loop(self, poll: float) -> None:
        while not self._stop:
            book = self._books(poll)
            if book.complete:
                break
            if not book.should_ask():
                self._wait(book, poll)  # every trial taken: wait for running ones (or for dead ones to go stale)
                continue
            self._waiting = False
            self._one_trial()

    def _books(self, poll: float) -> Ledger:
        """The study's books after failing stale trials and re-queuing orphans."""
        optuna.storages.fail_stale_trials(self.study)
        book = self.ledger()
        if book.orphans(2 * self.grace + poll):
            self._requeue_orphans()
        return book

    def stop(self) -> None:
        """Finish the current trial, then return from :meth:`run`."""
        self._stop = True

    def _requeue_orphans(self) -> None:
        with admission_lock(self.storage, self.cfg.storage_url(), self.study.study_name):
            for t in self.ledger().orphans(2 * self.grace):
                log.warning("trial %d lost its worker and was never re-queued: re-queuing it", t.number)
                self.retry(self.study, t)

    # ------------------------------------------------------------ trials
    def _one_trial(self) -> None:
        trial = self.study.ask()
        tid = trial._trial_id
        with Heartbeat(self.storage, tid, float(self.storage.get_heartbeat_interval() or 60)):
            try:
                self._admit_and_train(trial)
            except KeyboardInterrupt:
                # Interrupted (Ctrl-C, SIGTERM): give the trial back so a rerun trains it again.
                self._interrupted(trial)
                raise

    def _interrupted(self, trial: optuna.Trial) -> None:
        try:
            frozen = self.storage.get_trial(trial._trial_id)
            if frozen.state == TrialState.RUNNING:
                trial.set_user_attr(ATTR_INTERRUPTED, True)  # export: INTERRUPTED, not a dead worker's LOST
                self.study.tell(trial, state=TrialState.FAIL)
                if ATTR_KEY in frozen.user_attrs:
                    self.retry(self.study, self.storage.get_trial(trial._trial_id))
                mark_interrupted(trial_dir(self.cfg.out, trial.number))
                log.warning("trial %d interrupted; it is re-queued for the next run", trial.number)
        except Exception as e:  # the storage may be gone too; the heartbeat timeout then handles it
            log.warning("could not give back trial %d (%s); it is re-queued after the heartbeat timeout",
                        trial.number, e)

    def _admit_and_train(self, trial: optuna.Trial) -> None:
        me = self.storage.get_trial(trial._trial_id)
        if ATTR_REJECTED in me.user_attrs:  # a retry of a trial rejected just before its worker died
            return self._reject(trial, str(me.user_attrs[ATTR_REJECTED]))
        params = self.space.suggest(trial)
        try:
            graph = self.space.graph(params)
        except FrozenTargetError as e:
            return self._reject(trial, f"frozen: {e}")  # (FrozenTargetError says why)
        key = self.space.key(params)
        if is_retry(me) and ATTR_KEY in me.user_attrs:
            history = retry_history(me)
            with admission_lock(self.storage, self.cfg.storage_url(), self.study.study_name):
                dup = self.ledger().redundant_retry(self.storage.get_trial(trial._trial_id))
            if dup is not None:
                return self._reject(trial, f"duplicate: trial {dup} already re-runs this lost trial")
            if len(history) > self.cfg.max_retry:
                return self._fail(trial, f"lost its worker {len(history)} times (killed, or out of host memory); "
                                         f"not retried again (--max-retry {self.cfg.max_retry})")
        else:
            with admission_lock(self.storage, self.cfg.storage_url(), self.study.study_name):
                reason = self.ledger().admission(self.storage.get_trial(trial._trial_id), key)
                if reason is None:
                    trial.set_user_attr(ATTR_KEY, key)
            if reason is not None:
                return self._reject(trial, reason)
        self._train(trial, me, graph)

    def _start(self, trial: optuna.Trial, me: FrozenTrial, graph: Any, *, resumed: bool,
               data: Optional[dict] = None) -> tuple[int, Path, dict]:
        """The trial's seed, folder and ``trial.json`` info; its user attributes recorded.

        ``data``: the batches a packed trial sees (``data_seed``, ``data_offset``), recorded so that a
        retry trains on the same ones; a retry reads them back from its attributes.
        """
        cfg = self.cfg
        seed = int(me.user_attrs.get("seed", cfg.seed + root_of(me)))
        if data is None and "data_seed" in me.user_attrs:
            data = {"data_seed": int(me.user_attrs["data_seed"]), "data_offset": int(me.user_attrs["data_offset"])}
        out = trial_dir(cfg.out, trial.number)
        info = {"number": trial.number, "retry_of": (retry_history(me) or [None])[-1],
                "seed": seed, "graph": graph.to_dict(), "host": self.host, "pid": os.getpid(),
                "worker": self.worker_id, "dir": str(out.resolve()), "device": self.device, "resumed": resumed,
                "val_size": cfg.resolved_val_size(),
                **(data or {})}
        # The lone run that replays this trial (the same batches; on the CPU the same thread count).
        on_cpu = str(self.device) == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
        info["replay"] = replay_command(cfg, info, out.resolve(), threads=torch.get_num_threads() if on_cpu else None,
                                        frozen=bool(graph.frozen))
        for k in ("graph", "seed", "host", "pid", "dir", *(data or {})):
            trial.set_user_attr(k, info[k])
        start_trial_dir(out, info, resumed=resumed)
        what = f"trial {trial.number}" + (f" (retry of {info['retry_of']}{', resumed' if resumed else ''})"
                                          if info["retry_of"] is not None else "")
        log.info("%s: %s", what, describe_graph(graph))
        return seed, out, info

    def _recipe(self, seed: int, info: dict):
        """The trial's recipe: the search's, with a packed trial's batches (see :meth:`_start`)."""
        return self.cfg.train_config(seed, data_seed=info.get("data_seed"), data_offset=info.get("data_offset", 0))

    def _train(self, trial: optuna.Trial, me: FrozenTrial, graph: Any, resumed: Optional[bool] = None) -> None:
        """Train the admitted trial alone; ``resumed``: whether a lost trial's checkpoint was already taken
        over (None: look for one now)."""
        cfg = self.cfg
        out = trial_dir(cfg.out, trial.number)
        if resumed is None:
            resumed = resume_from(cfg.out, cfg.epochs, me, out) if is_retry(me) else False
        seed, out, info = self._start(trial, me, graph, resumed=resumed)
        t0 = time.monotonic()
        trainer: Optional[Trainer] = None
        reporter = EpochReporter(trial, graph.target, cfg.epochs, out)
        try:
            ensure_teachers(graph, cfg, device=self.device, step=cfg.step)
            trainer = Trainer(graph, cfg.data_spec(), self._recipe(seed, info), out, device=self.device,
                              step=cfg.step, teacher_dir=cfg.teacher_dir(), on_epoch_end=reporter,
                              progress=False, compile_cache=cfg.compile_cache_folder(),
                              expected_epochs=cfg.expected_epochs_per_trial())
            reporter.trainer = trainer
            final = trainer.run(resume=resumed)
            self._complete(trial, out, info, t0, final, graph.target)
        except optuna.TrialPruned as e:
            self._pruned(trial, out, info, t0, reporter, e)
        except TeacherPretrainError as e:
            self._teacher_failed(trial, out, info, t0, e)
        except NonFiniteLossError as e:
            self._non_finite(trial, out, info, t0, str(e))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if _is_oom(e):
                del trainer
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                return self._out_of_memory(trial, out, info, t0, e)
            self._aborted(trial, out, e)
        finally:
            self.trained += 1
