"""A trial's folder ``<out>/trials/<number>``: where it is, its ``trial.json``, taking over a lost
trial's checkpoint for a retry, and the one-line description of its graph."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial

from ..io import atomic_write_json, atomic_write_text
from ..run_files import read_metrics
from .ledger import retry_history

__all__ = ["trial_dir", "describe_graph", "resume_from", "start_trial_dir", "finish_trial_dir"]

log = logging.getLogger("ktg_fast.search")


def trial_dir(out: str | os.PathLike, number: int) -> Path:
    """``<out>/trials/<number, 5 digits>``."""
    return Path(out) / "trials" / f"{number:05d}"


def describe_graph(graph: Any) -> str:
    """``nodes 1:resnet8, 2:resnet8 (frozen); 3 edges``: a trial's graph in one line of the log."""
    nodes = ", ".join(f"{i}:{n.model}{' (frozen)' if graph.is_frozen(i) else ''}"
                      for i, n in enumerate(graph.nodes, start=1))
    edges = sum(1 for s in range(graph.num_nodes + 1) for t in range(1, graph.num_nodes + 1)
                if s != t and graph.gates[s][t] != "cutoff")
    return f"nodes {nodes}; {edges} edge{'' if edges == 1 else 's'}"


def resume_from(search_out: str | os.PathLike, epochs: int, me: FrozenTrial, out: Path) -> bool:
    """Copy the newest checkpoint of the dead trials of ``me``'s lineage (on this machine) into ``out``.

    Args:
        search_out: the search's ``--out`` folder.
        epochs: the search's epochs per trial (a trial killed after its last epoch is trained afresh).
        me: the retry.
        out: the retry's folder (replaced by the copy).

    Returns:
        Whether a checkpoint was taken over (the retry then resumes it).
    """
    for number in reversed(retry_history(me)):
        src = trial_dir(search_out, int(number))
        if not (src / "checkpoint.pt").is_file() or (src / "final.json").is_file():
            continue
        done = [r["epoch"] for r in read_metrics(src / "metrics.jsonl")]
        if done and max(done) >= epochs:
            continue  # killed while finishing: its last epoch may lack final.json; train afresh
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("trial.json", "error.txt", "*.tmp"))
        records = read_metrics(out / "metrics.jsonl")  # drop a line the kill may have cut short
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        log.info("trial %d resumes from the checkpoint of trial %d", me.number, number)
        return True
    return False


def start_trial_dir(out: Path, info: dict, *, resumed: bool) -> None:
    """Create the trial's folder and write ``trial.json`` (state RUNNING); a folder left by an earlier
    study in the same ``--out`` (when not resuming) is kept, renamed out of the way."""
    if not resumed and out.exists():
        aside = out.with_name(f"{out.name}.old-{int(time.time())}")
        out.rename(aside)
        log.warning("trial folder %s already existed (an earlier study in this --out?); moved to %s", out, aside)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "trial.json", {**info, "state": "RUNNING"})


def mark_interrupted(out: Path, *, state: str = "INTERRUPTED",
                     reason: str = "interrupted before it finished; re-queued for the next run") -> None:
    """A trial given back unfinished (Ctrl-C, SIGTERM, its pack's error; ``state="LOST"``: its worker died and
    its heartbeat went stale): ``trial.json`` says so rather than RUNNING (its retry, a new trial, resumes
    from ``checkpoint.pt`` when there is one)."""
    path = out / "trial.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no folder here (another machine's trial), or a file cut short by the kill: the retry writes its own
    if info.get("state") == "RUNNING":
        atomic_write_json(path, {**info, "state": state, "fail_reason": reason})


def finish_trial_dir(trial: optuna.Trial, out: Path, info: dict, state: str, t0: float, *,
                     value: Optional[float] = None, epochs: int = 0, reason: Optional[str] = None) -> None:
    """Record a trial's end: its time and epochs as user attributes, ``trial.json`` with ``state``; the
    full checkpoint is removed unless the trial failed (the target's weights are in ``nodes/``)."""
    elapsed = time.monotonic() - t0
    trial.set_user_attr("time_s", round(elapsed, 3))
    trial.set_user_attr("epochs", epochs)
    atomic_write_json(out / "trial.json", {**info, "state": state, "value": value, "epochs": epochs,
                                            "time_s": elapsed, "fail_reason": reason})
    ckpt = out / "checkpoint.pt"
    if state != "FAIL" and ckpt.exists():
        ckpt.unlink()  # the full checkpoint is only for resuming
