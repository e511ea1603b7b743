"""Running a plan: each sub-run as a subprocess with its exact command recorded, skipped when its finished
marker is there and resumed (by its own command line) when not; progress and the time left on the way.

``<out>`` holds ``reproduce.json`` (the settings a rerun must repeat), ``commands.sh`` (every sub-run's
command, in order: running it again resumes them too), ``commands.log`` (what ran when, and how it
ended), ``logs/<run>.log`` (each sub-run's output), ``runs/``, ``teachers/``, ``graphs/`` and the results.
A killed reproduction leaves every finished sub-run finished; its sub-process is stopped with it.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ..cli_common import raise_terminated
from ..graph import Graph
from ..io import atomic_write_json, atomic_write_text, current_umask
from ..locks import folder_lock
from ..run_files import format_duration, is_tty
from .plan import Plan, Run, settings_key
from .table import write_results

__all__ = ["Runner", "ReproduceError", "check_out", "SETTINGS_FILE", "OUT_NAMES"]

log = logging.getLogger("ktg_fast.reproduce")

SETTINGS_FILE = "reproduce.json"
LOCK_FILE = ".reproduce.lock"
# What a reproduction writes into --out.
OUT_NAMES = frozenset({SETTINGS_FILE, LOCK_FILE, "commands.sh", "commands.log", "results.md", "results.json",
                       "results.png", "probe.json", "runs", "teachers", "graphs", "logs", "inductor-cache"})


class ReproduceError(ValueError):
    """A reproduction cannot go on; the message names the cause and the fix."""


def check_out(out: Path, key: dict) -> None:
    """Refuse an ``--out`` that is a file, holds something else, or a reproduction with other settings."""
    if out.exists() and not out.is_dir():
        raise ReproduceError(f"--out {out} is a file: give a folder (a new one, or this reproduction's to resume it)")
    if not out.is_dir():
        return
    names = sorted(n for n in os.listdir(out) if not (n.startswith(".") and n.endswith(".tmp")))
    saved = out / SETTINGS_FILE
    if SETTINGS_FILE not in names:
        foreign = [n for n in names if n not in OUT_NAMES]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ReproduceError(f"--out {out} holds files a reproduction does not write ({shown}): choose a new or "
                                 "empty folder, or the folder of the same reproduction to resume it")
        return
    try:
        old = json.loads(saved.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReproduceError(f"{saved} cannot be read ({e}): restore it, or use another --out") from None
    diffs = [f"{k}: {old.get(k)!r} in the folder, {key.get(k)!r} now" for k in sorted(set(old) | set(key))
             if old.get(k) != key.get(k)]
    if diffs:
        raise ReproduceError(f"--out {out} holds a reproduction with other settings ({'; '.join(diffs)}): rerun it "
                             "with its own flags to resume it, or choose another --out for these")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the sub-process gets SIGTERM when the reproduction dies, even by SIGKILL (no orphan keeps writing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _error_line(path: Path) -> str:
    """The sub-run's ``error:`` line (or its last line) from its log."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:500]


class Runner:
    """Run ``plan``'s sub-runs in order under a lock on ``<out>``; ``estimate(run)`` gives seconds."""

    def __init__(self, plan: Plan, *, estimate: Callable[[Run], float], argv: list[str], progress: bool = True,
                 poll_s: float = 2.0):
        self.plan, self.estimate, self.argv, self.poll_s = plan, estimate, argv, poll_s
        self.out = plan.settings.out
        self.show_bar = progress and is_tty(sys.stderr)
        self.bar = None
        self.est: dict[str, float] = {}
        self.spent = 0.0  # seconds of the sub-runs run by this process, and their estimate
        self.spent_est = 0.0

    # ------------------------------------------------------------------ files
    def _write_commands(self) -> None:
        lines = ["#!/usr/bin/env bash",
                 "# Every sub-run of this reproduction, in order (each resumes its own run when run again; the",
                 "# mixed DML graphs are in graphs/, the teachers of frozen nodes are added once a search found them):",
                 f"#   {shlex.join(['python', '-m', 'ktg_fast.reproduce', *self.argv])}",
                 "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", ""]
        rows = {r.run: r for r in reversed(self.plan.rows) if r.run}
        for run in self.plan.runs.values():
            lines.append(f"# {rows[run.id].label if run.id in rows else run.label} -> {run.out}")
            lines += [shlex.join(c) for c in run.commands] + [""]
        atomic_write_text(self.out / "commands.sh", "\n".join(lines))
        os.chmod(self.out / "commands.sh", 0o777 & ~current_umask())

    def _note(self, text: str) -> None:
        with open(self.out / "commands.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    # --------------------------------------------------------------- progress
    def _left(self) -> float:
        """Seconds left: the estimate of what is not finished, scaled by how this process's runs compared."""
        scale = self.spent / self.spent_est if self.spent_est > 0 and self.spent > 0 else 1.0
        return scale * sum(self.est[r.id] for r in self.plan.runs.values() if not r.finished())

    def _tick(self, run: Run, base: float) -> None:
        if self.bar is None:
            return
        expected = run.work.total_epochs
        frac = min(0.99, run.epochs_done() / expected) if expected else 0.0
        self.bar.n = min(self.bar.total, round(base + frac * self.est[run.id]))
        self.bar.refresh()

    # -------------------------------------------------------------------- run
    def run(self) -> int:
        """Run every sub-run not finished yet; write the results after each; return 0."""
        self.out.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.out, what="python -m ktg_fast.reproduce", else_=None, name=LOCK_FILE):
            return self._run()

    def _run(self) -> int:
        from tqdm.auto import tqdm  # local: only a run draws a bar

        prev = signal.signal(signal.SIGTERM, raise_terminated)  # stops as Ctrl-C does, but exits 143
        try:
            atomic_write_json(self.out / SETTINGS_FILE, {"command": ["python", "-m", "ktg_fast.reproduce", *self.argv],
                                                         "cwd": os.getcwd(),
                                                         "settings": settings_key(self.plan.settings)})
            for run in self.plan.runs.values():
                if run.graph_file and not run.graph_file[0].exists():
                    run.graph_file[1].save(run.graph_file[0])
            self._write_commands()
            write_results(self.plan, chart=False)
            runs = list(self.plan.runs.values())
            self.est = {r.id: self.estimate(r) for r in runs}
            done = sum(self.est[r.id] for r in runs if r.finished())
            self._say(f"{len(runs)} sub-runs, {sum(r.finished() for r in runs)} finished before; estimated "
                      f"{format_duration(self._left())} left (the plan: python -m ktg_fast.reproduce ... --dry-run)")
            self.bar = tqdm(total=max(1, round(sum(self.est.values()))), initial=round(done), unit="s",
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
                            disable=not self.show_bar, file=sys.stderr) if self.show_bar else None
            for i, run in enumerate(runs, start=1):
                self._do(run, f"[{i}/{len(runs)}]")
            write_results(self.plan)
        finally:
            signal.signal(signal.SIGTERM, prev)
            if self.bar is not None:
                self.bar.close()
        return 0

    def _do(self, run: Run, tag: str) -> None:
        if run.finished():
            self._note(f"skip {run.id}: finished before")
            log.debug("%s %s: finished before", tag, run.label)
            return
        if run.kind == "retrain":
            for teacher in self._teachers(run):
                self._do(teacher, f"{tag} (teacher)")
        rows = self.plan.row_labels(run.id)
        self._say(f"{tag} {'; '.join(rows) or run.label}: {run.label} in {run.out} (about "
                  f"{format_duration(self.est[run.id])}; {format_duration(self._left())} left in all)")
        if self.bar is not None:
            self.bar.set_description_str((rows[0] if rows else run.label)[:60])
        base = self.bar.n if self.bar is not None else 0.0
        t0 = time.monotonic()
        for cmd in run.commands:
            self._exec(run, cmd, base)
        if not run.finished():
            raise ReproduceError(f"{run.label}: its commands ended without error but left no finished marker in "
                                 f"{run.out}; see {self.out / 'logs' / (run.id + '.log')}")
        self.spent += time.monotonic() - t0
        self.spent_est += self.est[run.id]
        if self.bar is not None:
            self.bar.n = min(self.bar.total, round(base + self.est[run.id]))
            self.bar.refresh()
        write_results(self.plan, chart=False)  # the chart once, at the end (matplotlib takes seconds)

    def _teachers(self, run: Run) -> list[Run]:
        """Teachers of the frozen nodes of a search's best graph, pre-trained on the whole training set."""
        path = run.search / "best" / "graph.yaml"
        if not path.is_file():
            raise ReproduceError(f"the search in {run.search} finished without a completed trial (every trial "
                                 f"pruned or failed, see {run.search / 'trials.md'}): raise --trials or --epochs in "
                                 "a new --out")
        graph = Graph.load(path)
        out = []
        for t in graph.frozen:
            if graph.nodes[t - 1].checkpoint == "pretrained":
                teacher = self.plan.teacher_run(graph.nodes[t - 1].model)
                if teacher.id not in self.est:
                    self.est[teacher.id] = self.estimate(teacher)
                    if self.bar is not None:
                        self.bar.total += round(self.est[teacher.id])
                    self._write_commands()
                out.append(teacher)
        return out

    def _exec(self, run: Run, cmd: list[str], base: float) -> None:
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        path = logs / f"{run.id}.log"
        text = shlex.join(cmd)
        self._note(f"start {run.id}: {text}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        with open(path, "a") as f:
            f.write(f"\n$ {text}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=self.poll_s)
                        break
                    except subprocess.TimeoutExpired:
                        self._tick(run, base)
            except BaseException:
                _stop(proc)
                self._note(f"stopped {run.id} (interrupted)")
                raise
        took = format_duration(time.monotonic() - t0)
        if rc != 0:
            self._note(f"failed {run.id}: exit {rc} after {took}")
            why = f"signal {-rc}" if rc < 0 else f"exit {rc}"
            raise ReproduceError(f"{run.label} failed ({why}): {_error_line(path) or 'no output'}. Its log: {path}. "
                                 "Fix the cause and run the same command again: finished sub-runs are kept and "
                                 "this one resumes")
        self._note(f"finished {run.id} in {took}")
