"""How a search trial ends, told to Optuna and written to its folder: complete, pruned, rejected before
training, failed (a non-finite loss, out of memory) or aborted by an error that is not the graph's fault."""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..io import atomic_write_text
from .ledger import ATTR_FAIL, ATTR_REJECTED
from .space import SearchError
from .teachers import existing_clauses
from .trial_files import finish_trial_dir
from .trial_hooks import EpochReporter

__all__ = ["TrialOutcomes", "Abort"]

log = logging.getLogger("ktg_fast.search")


class Abort(SearchError):
    """An error that is not the trial's fault (missing data, a bug): the worker stops with this message."""


class TrialOutcomes:
    """A worker's ways of ending a trial (needs ``self.study`` and ``self.ledger()``)."""

    def _reject(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr(ATTR_REJECTED, reason)
        self.study.tell(trial, state=TrialState.FAIL)
        log.info("trial %d rejected before training (%s)", trial.number, reason)

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr(ATTR_FAIL, reason)
        self.study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, reason)

    def _complete(self, trial: optuna.Trial, out: Path, info: dict, t0: float, final: dict, target: int) -> None:
        value = float(final["val_acc"][target - 1])
        trial.set_user_attr("val_acc", [float(a) for a in final["val_acc"]])
        epochs = int(final["epoch"])
        finish_trial_dir(trial, out, info, "COMPLETE", t0, value=value, epochs=epochs)
        before = self.ledger().best()
        self.study.tell(trial, value)
        log.info("trial %d complete: target val %.2f%% after %d epoch%s (%.0f s)", trial.number, value,
                 epochs, "" if epochs == 1 else "s", time.monotonic() - t0)
        if before is None or value > before.value:
            log.info("new best: trial %d, target val %.2f%%", trial.number, value)

    def _pruned(self, trial: optuna.Trial, out: Path, info: dict, t0: float, reporter: EpochReporter,
                e: BaseException) -> None:
        rec = reporter.record or {}
        if rec:
            trial.set_user_attr("val_acc", [float(a) for a in rec["val_acc"]])
        finish_trial_dir(trial, out, info, "PRUNED", t0, epochs=int(rec.get("epoch", 0)))
        self.study.tell(trial, state=TrialState.PRUNED)
        log.info("trial %d %s (%.0f s)", trial.number, e, time.monotonic() - t0)

    def _teacher_failed(self, trial: optuna.Trial, out: Path, info: dict, t0: float, e: BaseException) -> None:
        # Not the graph's fault: the trial does not count, and the search stops with the teacher's story.
        finish_trial_dir(trial, out, info, "REJECTED", t0, reason=str(e))
        self._reject(trial, f"teacher: {e}")
        raise Abort(f"trial {trial.number}: {e}") from None

    def _non_finite(self, trial: optuna.Trial, out: Path, info: dict, t0: float, message: str) -> None:
        # The trainer's message names the node by its index in this trial's graph.
        reason = existing_clauses(message.strip())
        reason = reason if reason.startswith("non-finite") else f"non-finite loss: {reason}"
        finish_trial_dir(trial, out, info, "FAIL", t0, reason=reason)
        self._fail(trial, reason)

    def _out_of_memory(self, trial: optuna.Trial, out: Path, info: dict, t0: float, e: BaseException) -> None:
        finish_trial_dir(trial, out, info, "FAIL", t0, reason=f"out of memory: {e}")
        self._fail(trial, f"out of memory on {self.device}: {str(e).splitlines()[0]}")

    def _aborted(self, trial: optuna.Trial, out: Path, e: BaseException) -> None:
        """Not the graph's fault: give the trial back (not counted) and stop this worker."""
        atomic_write_text(out / "error.txt", traceback.format_exc())
        self._reject(trial, f"aborted: {type(e).__name__}: {e}")
        raise Abort(f"trial {trial.number} stopped by an error that is not the graph's fault "
                     f"(details in {out / 'error.txt'}): {e}") from e
