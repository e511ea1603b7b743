"""What a training run writes and reads besides checkpoints: its metrics log, the settings that differ
from a checkpoint's (as command-line flags), and human-readable durations and epoch lines."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from .io import atomic_write_text

__all__ = ["early_estimate_line", "estimate_line", "fingerprint_diff", "read_metrics", "truncate_metrics", "read_json", "format_duration", "is_tty",
           "short_record", "epoch_line"]


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: Optional[float], *, compact: bool = False) -> str:
    """A duration for people: ``42 s``, ``7 min 5 s``, ``4 h 26 min``, ``3 d 2 h`` in sentences;
    ``42s``, ``3m05s``, ``1h02m`` with ``compact`` (status lines, table cells); ``?`` for None, NaN or inf."""
    if seconds is None or seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    s = int(round(seconds))
    if compact:
        if s >= 3600:
            return f"{s // 3600}h{(s % 3600) // 60:02d}m"
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{max(s, 0)}s"
    if s < 60:
        return f"{max(seconds, 0):.0f} s" if seconds >= 1 else f"{max(seconds, 0):.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """The settings that differ between a checkpoint's fingerprint and this run's, as command-line
    flags: ``--lr 0.05 in the checkpoint, 0.1 now``."""
    out = []
    g_old, g_new = old.get("graph") or {}, new.get("graph") or {}
    n_old, n_new = g_old.get("nodes") or [], g_new.get("nodes") or []
    if len(n_old) != len(n_new):  # another graph altogether: its nodes, not every gate
        def models(nodes: list) -> str:
            return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} (" + \
                ", ".join(str(n.get("model") if isinstance(n, dict) else n) for n in nodes) + ")"
        out.append(f"--graph {models(n_old)} in the checkpoint, {models(n_new)} now")
        old, new = {k: v for k, v in old.items() if k != "graph"}, {k: v for k, v in new.items() if k != "graph"}
    for path, a, b in _diff(old, new, ""):
        key = path.split(".", 1)[1] if path.startswith("config.") else path
        if path.startswith("graph"):
            label = f"--graph ({path[len('graph.'):] or 'graph'})"
        else:
            label = _FLAGS.get(key, key)
        out.append(f"{label} {_fmt(a)} in the checkpoint, {_fmt(b)} now")
    return out


_FLAGS = {"dataset": "--dataset", "val_size": "--val-size", "train_subset": "--train-subset",
          "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "momentum": "--momentum",
          "nesterov": "Nesterov momentum (--no-nesterov)", "weight_decay": "--weight-decay",
          "milestones": "--milestones", "gamma": "--gamma", "seed": "seed", "augment": "augmentation (--no-augment)",
          "node_lr": "per-node learning rates", "check_every": "check_every"}


def _fmt(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, list):
        return " ".join(_fmt(x) for x in v) if all(not isinstance(x, (list, dict)) for x in v) else json.dumps(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _diff(a: Any, b: Any, path: str):
    """Yield (dotted path, a's value, b's value) of every leaf where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            yield from _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and path.startswith("graph"):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield path, a, b


def short_record(record: dict, target: int) -> dict:
    out = {"loss": f"{sum(record['train_loss']):.3f}"}
    for split in ("val", "test"):
        if f"{split}_acc" in record:
            out[split] = f"{record[f'{split}_acc'][target - 1]:.2f}"
    return out


def epoch_line(record: dict, target: int) -> str:
    """``loss 1.234, target (node 1) val 45.60 %, test 44.10 %``: one epoch in a log line."""
    parts = [f"loss {sum(record['train_loss']):.3f}"]
    accs = [f"{split} {record[f'{split}_acc'][target - 1]:.2f} %" for split in ("val", "test")
            if f"{split}_acc" in record]
    if accs:
        parts.append(f"target (node {target}) " + ", ".join(accs))
    return ", ".join(parts)


def truncate_metrics(path: Path, epoch: int) -> None:
    """Keep one record per epoch up to ``epoch`` (the checkpoint's; 0 without one): drop lines written
    after the checkpoint, repeated epochs and a line cut short by a kill."""
    if not path.exists():
        return
    by_epoch: dict[int, dict] = {}
    for r in read_metrics(path):
        if isinstance(r, dict) and isinstance(r.get("epoch"), int) and 1 <= r["epoch"] <= epoch:
            by_epoch[r["epoch"]] = r  # a repeated epoch: the later record is the checkpoint's
    atomic_write_text(path, "".join(json.dumps(by_epoch[e]) + "\n" for e in sorted(by_epoch)))


def read_metrics(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (none if it is missing); a line cut short by a kill is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def early_estimate_line(done: int, seconds: float, iters_per_epoch: int, epochs_left: int) -> str:
    """The run's time from the first batches' speed (during the first epoch of a process)."""
    total = seconds / done * iters_per_epoch * epochs_left
    return (f"speed so far {done / seconds:.1f} batches/s: training the {epochs_left} epoch"
            f"{'' if epochs_left == 1 else 's'} left takes about {format_duration(total)}, plus evaluation")


def estimate_line(epoch: int, seconds: float, epochs: int, warmup_s: float = 0.0) -> str:
    """After epoch ``epoch`` (0-based) took ``seconds``: the whole run's time and when it ends.

    ``warmup_s``: the part of ``seconds`` that later epochs do not pay (compiling, capturing a CUDA graph).
    """
    left = epochs - epoch - 1
    if not left:
        return f"epoch {epoch + 1} took {format_duration(seconds)} with evaluation"
    per_epoch = max(seconds - warmup_s, 0.0)
    finish = time.strftime("%H:%M", time.localtime(time.time() + per_epoch * left))
    total = format_duration(seconds + per_epoch * left)
    what = (f"the whole run ({epochs} epochs) takes about {total}" if epoch == 0 else
            f"epochs {epoch + 1}-{epochs} of this resumed run take about {total}")
    warm = f" ({format_duration(warmup_s)} of it compiling or capturing, paid once)" if warmup_s >= 1 else ""
    return (f"epoch {epoch + 1} took {format_duration(seconds)} with evaluation{warm}: {what} at this speed, "
            f"done around {finish}")
