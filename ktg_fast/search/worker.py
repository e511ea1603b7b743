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

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..io import atomic_write_json, atomic_write_text
from ..run_files import read_metrics
from .trial_hooks import EpochReporter, Heartbeat
from ..trainer import NonFiniteLossError, Trainer
from .config import SearchConfig
from .ledger import ATTR_FAIL, ATTR_KEY, ATTR_REJECTED, Ledger, is_retry, retry_history, root_of
from .space import FrozenTargetError, SearchError
from .storage import admission_lock, open_storage
from .study import BUDGET_ATTR, load_search_study
from .teachers import TeacherPretrainError, ensure_teachers, existing_clauses

__all__ = ["Worker", "trial_dir"]

log = logging.getLogger("ktg_fast.search")


def trial_dir(out: str | os.PathLike, number: int) -> Path:
    """``<out>/trials/<number, 5 digits>``."""
    return Path(out) / "trials" / f"{number:05d}"


class _Abort(SearchError):
    """An error that is not the trial's fault (missing data, a bug): the worker stops with this message."""


def raise_interrupt(signum: int, frame: Any) -> None:
    """A signal handler that stops like Ctrl-C (SIGTERM from schedulers: the trial is given back)."""
    raise KeyboardInterrupt(f"signal {signum}")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class Worker:
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
                                    retry_callback=self.retry)
        self.grace = spec["grace"]
        self.study = load_search_study(cfg, self.storage, seed=cfg.sampler_seed(self.worker_id))

    def budget(self) -> int:
        return int(self.study.user_attrs.get(BUDGET_ATTR, self.cfg.trials))

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
            while not self._stop:
                optuna.storages.fail_stale_trials(self.study)
                book = self.ledger()
                if book.complete:
                    break
                if book.orphans(2 * self.grace + poll):
                    self._requeue_orphans()
                if not book.should_ask():
                    time.sleep(poll)  # every slot taken: wait for running trials (or for dead ones to go stale)
                    continue
                self._one_trial()
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, prev)
        return self.trained

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
                self.study.tell(trial, state=TrialState.FAIL)
                if ATTR_KEY in frozen.user_attrs:
                    self.retry(self.study, self.storage.get_trial(trial._trial_id))
                log.warning("trial %d interrupted; it is re-queued for the next run", trial.number)
        except Exception as e:  # the storage may be gone too; the heartbeat timeout then handles it
            log.warning("could not give back trial %d (%s); it is re-queued after the heartbeat timeout",
                        trial.number, e)

    def _reject(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr(ATTR_REJECTED, reason)
        self.study.tell(trial, state=TrialState.FAIL)
        log.info("trial %d rejected before training (%s)", trial.number, reason)

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr(ATTR_FAIL, reason)
        self.study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, reason)

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

    def _train(self, trial: optuna.Trial, me: FrozenTrial, graph: Any) -> None:
        cfg = self.cfg
        root = root_of(me)
        seed = int(me.user_attrs.get("seed", cfg.seed + root))
        out = trial_dir(cfg.out, trial.number)
        resumed = self._resume_from(me, out) if is_retry(me) else False
        if not resumed and out.exists():  # left by an earlier study in the same --out: keep it, out of the way
            aside = out.with_name(f"{out.name}.old-{int(time.time())}")
            out.rename(aside)
            log.warning("trial folder %s already existed (an earlier study in this --out?); moved to %s", out, aside)
        info = {"number": trial.number, "retry_of": (retry_history(me) or [None])[-1],
                "seed": seed, "graph": graph.to_dict(), "host": self.host, "pid": os.getpid(),
                "worker": self.worker_id, "dir": str(out.resolve()), "device": self.device, "resumed": resumed}
        for k in ("graph", "seed", "host", "pid", "dir"):
            trial.set_user_attr(k, info[k])
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "trial.json", {**info, "state": "RUNNING"})
        what = f"trial {trial.number}" + (f" (retry of {info['retry_of']}{', resumed' if resumed else ''})"
                                          if info["retry_of"] is not None else "")
        log.info("%s: %s", what, _describe(graph))
        t0 = time.monotonic()
        target = graph.target
        trainer: Optional[Trainer] = None
        reporter = EpochReporter(trial, target, cfg.epochs, out)
        try:
            ensure_teachers(graph, cfg, device=self.device, step=cfg.step)
            trainer = Trainer(graph, cfg.data_spec(), cfg.train_config(seed), out, device=self.device,
                              step=cfg.step, teacher_dir=cfg.teacher_dir(), on_epoch_end=reporter,
                              progress=False, compile_cache=cfg.compile_cache_folder())
            reporter.trainer = trainer
            final = trainer.run(resume=resumed)
            value = float(final["val_acc"][target - 1])
            trial.set_user_attr("val_acc", [float(a) for a in final["val_acc"]])
            self._finish(trial, out, info, "COMPLETE", t0, value=value, epochs=int(final["epoch"]))
            before = self.ledger().best()
            self.study.tell(trial, value)
            epochs = int(final["epoch"])
            log.info("trial %d complete: target val %.2f%% after %d epoch%s (%.0f s)", trial.number, value,
                     epochs, "" if epochs == 1 else "s", time.monotonic() - t0)
            if before is None or value > before.value:
                log.info("new best: trial %d, target val %.2f%%", trial.number, value)
        except optuna.TrialPruned as e:
            rec = reporter.record or {}
            if rec:
                trial.set_user_attr("val_acc", [float(a) for a in rec["val_acc"]])
            self._finish(trial, out, info, "PRUNED", t0, epochs=int(rec.get("epoch", 0)))
            self.study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d %s (%.0f s)", trial.number, e, time.monotonic() - t0)
        except TeacherPretrainError as e:
            # Not the graph's fault: the trial does not count, and the search stops with the teacher's story.
            self._finish(trial, out, info, "REJECTED", t0, reason=str(e))
            self._reject(trial, f"teacher: {e}")
            raise _Abort(f"trial {trial.number}: {e}") from None
        except NonFiniteLossError as e:
            # The trainer's message names the node by its index in this trial's graph.
            reason = existing_clauses(str(e).strip())
            reason = reason if reason.startswith("non-finite") else f"non-finite loss: {reason}"
            self._finish(trial, out, info, "FAIL", t0, reason=reason)
            self._fail(trial, reason)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if _is_oom(e):
                del trainer
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                self._finish(trial, out, info, "FAIL", t0, reason=f"out of memory: {e}")
                return self._fail(trial, f"out of memory on {self.device}: {str(e).splitlines()[0]}")
            # Not the graph's fault: give the trial back (not counted) and stop this worker.
            atomic_write_text(out / "error.txt", traceback.format_exc())
            self._reject(trial, f"aborted: {type(e).__name__}: {e}")
            raise _Abort(f"trial {trial.number} stopped by an error that is not the graph's fault "
                         f"(details in {out / 'error.txt'}): {e}") from e
        finally:
            self.trained += 1

    def _resume_from(self, me: FrozenTrial, out: Path) -> bool:
        """Copy the newest checkpoint of the dead trials of this lineage (on this machine) into ``out``."""
        for number in reversed(retry_history(me)):
            src = trial_dir(self.cfg.out, int(number))
            if not (src / "checkpoint.pt").is_file() or (src / "final.json").is_file():
                continue
            done = [r["epoch"] for r in read_metrics(src / "metrics.jsonl")]
            if done and max(done) >= self.cfg.epochs:
                continue  # killed while finishing: its last epoch may lack final.json; train afresh
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("trial.json", "error.txt", "*.tmp"))
            records = read_metrics(out / "metrics.jsonl")  # drop a line the kill may have cut short
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            log.info("trial %d resumes from the checkpoint of trial %d", me.number, number)
            return True
        return False

    def _finish(self, trial: optuna.Trial, out: Path, info: dict, state: str, t0: float, *,
                value: Optional[float] = None, epochs: int = 0, reason: Optional[str] = None) -> None:
        elapsed = time.monotonic() - t0
        trial.set_user_attr("time_s", round(elapsed, 3))
        trial.set_user_attr("epochs", epochs)
        atomic_write_json(out / "trial.json", {**info, "state": state, "value": value, "epochs": epochs,
                                                "time_s": elapsed, "fail_reason": reason})
        ckpt = out / "checkpoint.pt"
        if state != "FAIL" and ckpt.exists():
            ckpt.unlink()  # the target's weights are in nodes/; the full checkpoint is only for resuming


def _describe(graph: Any) -> str:
    nodes = ", ".join(f"{i}:{n.model}{' (frozen)' if graph.is_frozen(i) else ''}"
                      for i, n in enumerate(graph.nodes, start=1))
    edges = sum(1 for s in range(graph.num_nodes + 1) for t in range(1, graph.num_nodes + 1)
                if s != t and graph.gates[s][t] != "cutoff")
    return f"nodes {nodes}; {edges} edge{'' if edges == 1 else 's'}"
