"""Which trials count, and which may start: the study's books, computed from its trials alone.

Optuna's trial list holds more than the search's trials: trials rejected before
training (target frozen, a graph already tried, the budget already full, a
teacher that could not be pre-trained) and
trials failed by a heartbeat timeout, each followed by a retry with the same
graph.  The books group trials into *lineages* (an original trial and its
retries, linked by the ``failed_trial`` system attribute that Optuna's retry
callback writes) and define:

- a lineage is *admitted* once one of its trials passed admission (it carries
  ``graph_key``), *rejected* when its original trial carries ``rejected``;
- an admitted lineage is *finished* when its latest (not rejected) trial is
  COMPLETE, PRUNED, or FAIL with a ``fail_reason`` (NaN, out of memory, lost
  too often); a FAIL without a reason is a trial whose worker died, awaiting
  its retry;
- ``--trials N`` is reached when N admitted lineages are finished.  Admission
  runs under a study-wide lock and admits at most N lineages, so the count is
  reached exactly, whatever the number of workers.
"""
from __future__ import annotations

import datetime as _dt
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["Lineage", "Ledger", "ATTR_KEY", "ATTR_REJECTED", "ATTR_FAIL", "root_of", "is_retry", "retry_history"]

ATTR_KEY = "graph_key"
ATTR_REJECTED = "rejected"
ATTR_FAIL = "fail_reason"
ATTR_INTERRUPTED = "interrupted"  # given back by Ctrl-C or SIGTERM (not a dead worker); re-queued like one


def _retried(t: FrozenTrial) -> Optional[int]:
    # Optuna's public helper (marked experimental: its warning says nothing to our users).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)


def retry_history(t: FrozenTrial) -> list[int]:
    """The trials ``t`` retries, the original first (empty when ``t`` is no retry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return list(optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t))


def root_of(t: FrozenTrial) -> int:
    """Number of the original trial of ``t``'s lineage."""
    original = _retried(t)
    return int(t.number if original is None else original)


def is_retry(t: FrozenTrial) -> bool:
    return _retried(t) is not None


@dataclass
class Lineage:
    """An original trial and its retries (same graph), by trial number."""

    root: int
    members: list[FrozenTrial] = field(default_factory=list)

    @property
    def first(self) -> Optional[FrozenTrial]:
        return next((t for t in self.members if t.number == self.root), None)

    @property
    def rejected(self) -> bool:
        first = self.first
        return first is not None and ATTR_REJECTED in first.user_attrs

    @property
    def live(self) -> list[FrozenTrial]:
        """Members not rejected themselves (a redundant retry is rejected alone)."""
        return [t for t in self.members if ATTR_REJECTED not in t.user_attrs]

    @property
    def admitted(self) -> bool:
        return not self.rejected and any(ATTR_KEY in t.user_attrs for t in self.members)

    @property
    def key(self) -> Optional[str]:
        return next((t.user_attrs[ATTR_KEY] for t in self.members if ATTR_KEY in t.user_attrs), None)

    @property
    def latest(self) -> Optional[FrozenTrial]:
        live = self.live
        return live[-1] if live else None

    @property
    def status(self) -> str:
        """``complete``, ``pruned``, ``failed`` (finished), ``running``, ``waiting`` or ``lost`` (awaiting retry)."""
        t = self.latest
        if t is None:
            return "lost"
        if t.state == TrialState.COMPLETE:
            return "complete"
        if t.state == TrialState.PRUNED:
            return "pruned"
        if t.state == TrialState.FAIL:
            return "failed" if t.user_attrs.get(ATTR_FAIL) else "lost"
        if t.state == TrialState.WAITING:
            return "waiting"
        return "running"

    @property
    def finished(self) -> bool:
        return self.status in ("complete", "pruned", "failed")


class Ledger:
    """The books of a study at one moment (see the module's docstring).

    Args:
        trials: every trial of the study.
        budget: N, the number of lineages the search runs.
    """

    def __init__(self, trials: Iterable[FrozenTrial], budget: int):
        self.budget = int(budget)
        self.trials = sorted(trials, key=lambda t: t.number)
        by_root: dict[int, Lineage] = {}
        for t in self.trials:
            by_root.setdefault(root_of(t), Lineage(root_of(t))).members.append(t)
        self.lineages = [by_root[r] for r in sorted(by_root)]
        self.admitted = [ln for ln in self.lineages if ln.admitted]
        self.counts = {s: 0 for s in ("complete", "pruned", "failed", "running", "waiting", "lost")}
        for ln in self.admitted:
            self.counts[ln.status] += 1
        self.rejected: dict[str, int] = {}
        for t in self.trials:
            reason = t.user_attrs.get(ATTR_REJECTED)
            if reason is not None:
                kind = str(reason).split(":")[0]
                self.rejected[kind] = self.rejected.get(kind, 0) + 1
        self.waiting_trials = sum(1 for t in self.trials if t.state == TrialState.WAITING)

    # ------------------------------------------------------------ totals
    @property
    def done(self) -> int:
        """Finished admitted lineages: what ``--trials`` counts."""
        return self.counts["complete"] + self.counts["pruned"] + self.counts["failed"]

    @property
    def free_slots(self) -> int:
        return max(0, self.budget - len(self.admitted))

    @property
    def complete(self) -> bool:
        return self.done >= self.budget

    def should_ask(self) -> bool:
        """Whether a worker should start a trial now (else wait for running ones)."""
        return not self.complete and (self.free_slots > 0 or self.waiting_trials > 0)

    def best(self) -> Optional[FrozenTrial]:
        """The COMPLETE trial with the highest value (ties: the earliest)."""
        done = [t for t in self.trials if t.state == TrialState.COMPLETE and t.value is not None
                and ATTR_REJECTED not in t.user_attrs]
        return max(done, key=lambda t: (t.value, -t.number)) if done else None

    def lineage_of(self, t: FrozenTrial) -> Optional[Lineage]:
        r = root_of(t)
        return next((ln for ln in self.lineages if ln.root == r), None)

    # --------------------------------------------------------- admission
    def admission(self, me: FrozenTrial, key: str) -> Optional[str]:
        """Why ``me`` may not start (None: it may); call under the study's admission lock.

        Reasons start with a kind (``budget``, ``duplicate``) and a colon.
        """
        mine = root_of(me)
        others = [ln for ln in self.admitted if ln.root != mine]
        if len(others) >= self.budget:
            return f"budget: the study already holds its {self.budget} trials"
        for ln in others:
            if ln.key == key:
                return f"duplicate: same graph as trial {ln.root} (auxiliary nodes may be renumbered)"
        return None

    def redundant_retry(self, me: FrozenTrial) -> Optional[int]:
        """For a retry: another trial of its lineage that finished, or runs with a lower number.

        Only possible when a lost trial was re-queued twice; the lowest-numbered
        retry runs and the others step aside.
        """
        ln = self.lineage_of(me)
        if ln is None:
            return None
        for t in ln.live:
            if t.number == me.number:
                continue
            finished = t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                t.state == TrialState.FAIL and t.user_attrs.get(ATTR_FAIL))
            if finished or (t.state == TrialState.RUNNING and t.number < me.number):
                return t.number
        return None

    def orphans(self, older_than_s: float, now: Optional[_dt.datetime] = None) -> list[FrozenTrial]:
        """Latest trials of admitted lineages whose worker died but that nobody re-queued.

        Optuna re-queues a stale trial right after failing it; a worker killed
        in between leaves the lineage with nothing to run.  Such trials older
        than ``older_than_s`` are returned so a worker can re-queue them.
        """
        now = now or _dt.datetime.now()
        out = []
        for ln in self.admitted:
            t = ln.latest
            if ln.status != "lost" or t is None or t.datetime_complete is None:
                continue
            if (now - t.datetime_complete).total_seconds() > older_than_s:
                out.append(t)
        return out

    # ---------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        best = self.best()
        return {
            "budget": self.budget, "done": self.done, **self.counts,
            "rejected": dict(self.rejected),
            "best_value": None if best is None else best.value,
            "best_trial": None if best is None else best.number,
        }
