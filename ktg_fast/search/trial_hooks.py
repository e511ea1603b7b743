"""A running trial's companions: its heartbeat thread and the trainer's per-epoch callback that reports
to Optuna and prunes at the rungs."""
from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any, Optional

import optuna

from ..run_files import read_metrics

__all__ = ["Heartbeat", "EpochReporter"]

log = logging.getLogger("ktg_fast.search")


class Heartbeat:
    """Record a trial's heartbeat every ``interval`` seconds from a thread (errors are logged, not fatal)."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # a busy database must not kill the trial
                log.warning("heartbeat of trial id %d not recorded: %s", self.trial_id, str(e).splitlines()[0])


class EpochReporter:
    """The trainer's per-epoch callback for one trial: reports the target's validation accuracy to
    Optuna (the epochs trained before a kill too, on a resumed run) and prunes at the rungs, saving
    the target's weights first (``nodes/node<t>_<model>.pt``)."""

    def __init__(self, trial: optuna.Trial, target: int, epochs: int, out: Path):
        self.trial, self.target, self.epochs, self.out = trial, target, epochs, out
        self.reported: set[int] = set()
        self.record: Optional[dict] = None
        self.trainer: Any = None  # set once the trainer exists

    def __call__(self, record: dict) -> None:
        epoch = int(record["epoch"])
        if len(self.reported) < epoch - 1:  # a resumed run: report the epochs trained before the kill
            for r in read_metrics(self.out / "metrics.jsonl"):
                if r["epoch"] < epoch and r["epoch"] not in self.reported:
                    self.trial.report(float(r["val_acc"][self.target - 1]), int(r["epoch"]))
                    self.reported.add(int(r["epoch"]))
        acc = float(record["val_acc"][self.target - 1])
        self.trial.report(acc, epoch)
        self.reported.add(epoch)
        self.record = record
        # No rung at the last epoch: a trial that trained every epoch is complete.
        if epoch < self.epochs and math.isfinite(acc) and self.trial.should_prune():
            if self.trainer is not None:
                self.trainer.save_node(self.target, epochs=epoch, val_acc=acc, pruned=True)
            raise optuna.TrialPruned(f"pruned after epoch {epoch} (target val {acc:.2f}%)")
