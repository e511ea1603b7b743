"""The live progress line: trials done, pruned, failed, best so far and ETA, read from the storage.

It reads the study (never the workers), so it shows the whole search: every
worker on every machine.  On a terminal it is a tqdm bar; in a log file, a
plain line each time something changes (at most every ``min_interval_s``).
"""
from __future__ import annotations

import datetime as _dt
import logging
import shutil
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

from optuna.trial import TrialState
from tqdm.auto import tqdm

from ..run_files import format_duration
from .ledger import Ledger

__all__ = ["Progress", "eta_seconds", "status_line"]

log = logging.getLogger("ktg_fast.search")


def eta_seconds(book: Ledger, *, done_since_start: int = 0, elapsed_s: float = 0.0,
                workers: Optional[int] = None) -> Optional[float]:
    """Seconds until ``--trials`` are finished.

    From this session's completion rate once two trials finished in it; before
    that from the mean duration of finished trials, divided by the number of
    trials running in parallel.
    """
    remaining = book.budget - book.done
    if remaining <= 0:
        return 0.0
    if done_since_start >= 2 and elapsed_s > 0:
        return remaining * elapsed_s / done_since_start
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in book.trials
                 if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_start and t.datetime_complete]
    if not durations:
        return None
    parallel = max(1, workers or 0, book.counts["running"])
    return remaining * (sum(durations) / len(durations)) / parallel


def status_line(book: Ledger, eta: Optional[float]) -> str:
    """``12/100 done (complete 3, pruned 8, failed 1) | running 2 | best 71.20% (#7) | ETA 1h02m``."""
    c = book.counts
    best = book.best()
    parts = [f"{book.done}/{book.budget} done (complete {c['complete']}, pruned {c['pruned']}, failed {c['failed']})",
             f"running {c['running']}" + (f", lost {c['lost']}" if c["lost"] else ""),
             "best " + (f"{best.value:.2f}% (#{best.number})" if best is not None else "-"),
             f"ETA {format_duration(eta, compact=True)}"]
    return " | ".join(parts)


class Progress:
    """Poll a study and show the status line until stopped.

    Args:
        study: the study (opened without heartbeats).
        budget: read the current trial budget (it may change while running).
        interval_s: seconds between polls.
        stream: where to write (default stderr).
        workers: local workers (for the ETA before any trial finished).
        announce: print ``new best: ...`` when the best trial changes (the first completed one included;
            not the best found before this session).  Off when the worker itself announces it.
    """

    def __init__(self, study: Any, budget: Callable[[], int], *, interval_s: float = 2.0,
                 stream: Optional[TextIO] = None, workers: Optional[int] = None, min_interval_s: float = 30.0,
                 announce: bool = True):
        self.study, self.budget, self.interval_s = study, budget, interval_s
        self.stream = stream or sys.stderr
        self.workers = workers
        self.min_interval_s = min_interval_s
        self.announce = announce
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bar: Any = None
        self._t0 = time.monotonic()
        self._done0: Optional[int] = None
        self._best: Optional[int] = None
        self._last_line = ""
        self._last_print = 0.0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    # --------------------------------------------------------------- poll
    def poll(self) -> Ledger:
        """Read the study once and update the display; return the books."""
        book = Ledger(self.study.get_trials(deepcopy=False), self.budget())
        best = book.best()
        if self._done0 is None:  # first poll: what was there before this session
            self._done0 = book.done
            self._best = best.number if best is not None else None
        elif best is not None and best.number != self._best:
            if self.announce:
                self._write(f"new best: trial {best.number}, target val {best.value:.2f}%")
            self._best = best.number
        eta = eta_seconds(book, done_since_start=book.done - self._done0, elapsed_s=time.monotonic() - self._t0,
                          workers=self.workers)
        line = status_line(book, eta)
        if self.tty:
            if self._bar is None:
                # A pty may report a 0 x 0 terminal; tqdm then draws nothing.
                size = shutil.get_terminal_size((120, 24))
                self._bar = tqdm(total=book.budget, initial=book.done, file=self.stream,
                                 ncols=max(size.columns, 60), nrows=max(size.lines, 10),
                                 bar_format="search |{bar:20}| {n_fmt}/{total_fmt} trials{postfix}")
            self._bar.total = book.budget
            self._bar.n = book.done
            self._bar.set_postfix_str(line.split(" done (", 1)[1].replace(")", "", 1), refresh=True)
        elif line != self._last_line and (time.monotonic() - self._last_print >= self.min_interval_s
                                          or book.complete or not self._last_line):
            print(f"[{_dt.datetime.now():%H:%M:%S}] {line}", file=self.stream, flush=True)
            self._last_line, self._last_print = line, time.monotonic()
        return book

    def _write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    # ----------------------------------------------------------- thread
    def start(self) -> "Progress":
        """Poll from a background thread (for a worker running in the main thread)."""
        self._thread = threading.Thread(target=self._loop, name="search-progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as e:  # a busy storage must not stop the search
                log.debug("progress poll failed: %s", e)

    def close(self) -> Optional[Ledger]:
        """Stop polling, show the final state, return it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        book = None
        try:
            self._last_print = 0.0
            book = self.poll()
        except Exception as e:
            log.debug("final progress poll failed: %s", e)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return book
