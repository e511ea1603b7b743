"""``python -m ktg_fast.search export``: the best graphs, a table of trials and plots, from the storage.

Writes into ``<out>`` (or ``--to``):

- ``best/graph.yaml`` (+ ``.dot``, ``.png``): the best completed graph, ready for
  ``python -m ktg_fast.train --graph``; ``top/<rank>-trial<N>/`` the top K;
- ``trials.md``: every trial with its state, epochs, target accuracy, graph;
  ``trials.json``: the same for programs;
- ``history.png`` (optimisation history) and ``intermediate.png`` (the target's
  validation accuracy after every epoch, per trial).

It only reads the study, so it runs while the search does, on any machine
that reaches the storage.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from optuna.trial import FrozenTrial, TrialState

from ..graph import Graph
from ..io import atomic_write_json, atomic_write_text
from .budget import rungs as budget_rungs
from .ledger import ATTR_FAIL, ATTR_INTERRUPTED, ATTR_REJECTED, Ledger, is_retry, retry_history, root_of
from ..run_files import format_duration
from .space import SearchSpace, gate_letters
from .storage import mask_url
from .study import BUDGET_ATTR, SPEC_ATTR
from .trial_files import trial_dir

__all__ = ["export_study", "ExportResult"]


class ExportResult(dict):
    """Paths written and the study's counts (a dict, printed by the CLI)."""


def _graph_of(t: FrozenTrial, space: Optional[SearchSpace]) -> Optional[Graph]:
    if "graph" in t.user_attrs:
        return Graph.from_dict(t.user_attrs["graph"], check_models=False)
    if space is not None:
        try:
            return space.graph(t.params)
        except Exception:
            return None
    return None


def _compact(graph: Graph, letters: dict[str, str]) -> tuple[str, str]:
    """('resnet32, wrn28_2', 'T-/·L/T·'-style rows: sources label,1..N; destinations 1..N)."""
    models = ", ".join(n.model + ("*" if graph.is_frozen(i) else "") for i, n in enumerate(graph.nodes, start=1))
    n = graph.num_nodes
    rows = []
    for s in range(n + 1):
        rows.append("".join("·" if s == t else letters.get(graph.gates[s][t], "?") for t in range(1, n + 1)))
    return models, " ".join(rows)


def _row(t: FrozenTrial, book: Ledger) -> dict[str, Any]:
    """One trial as a plain record (for trials.json and the table)."""
    state = t.state.name
    note = ""
    if ATTR_REJECTED in t.user_attrs:
        state, note = "REJECTED", str(t.user_attrs[ATTR_REJECTED])
    elif t.state == TrialState.FAIL:
        reason = t.user_attrs.get(ATTR_FAIL)
        if reason:
            note = str(reason)
        elif t.user_attrs.get(ATTR_INTERRUPTED):
            state, note = "INTERRUPTED", "stopped (Ctrl-C or SIGTERM); re-queued"
        else:
            state, note = "LOST", "worker died; re-queued"
    if is_retry(t):
        note = (f"retry of {(retry_history(t) or [root_of(t)])[-1]}; " + note).rstrip("; ")
    steps = sorted(t.intermediate_values)
    last = t.intermediate_values[steps[-1]] if steps else None
    dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    return {"number": t.number, "state": state, "value": t.value, "epochs": steps[-1] if steps else 0,
            "last_val_acc": last, "val_acc": t.user_attrs.get("val_acc"), "seed": t.user_attrs.get("seed"),
            "time_s": dur, "note": note, "params": dict(t.params), "graph": t.user_attrs.get("graph"),
            "host": t.user_attrs.get("host"), "dir": t.user_attrs.get("dir"),
            "intermediate": {int(k): v for k, v in sorted(t.intermediate_values.items())}}


def _table(rows: list[dict], book: Ledger, study: Any, url: str, space: Optional[SearchSpace]) -> str:
    letters = gate_letters(space.gates if space else ["cutoff", "through", "linear", "correct"])
    s = book.summary()
    best = book.best()
    lines = [f"# Search `{study.study_name}`", "",
             f"Storage: `{mask_url(url)}`" + (f"; search space: {space.describe()}" if space else ""), "",
             f"**{s['done']}/{s['budget']} trials finished**: {s['complete']} complete, {s['pruned']} pruned, "
             f"{s['failed']} failed; {s['running']} running" + (f", {s['lost']} lost (awaiting retry)" if s["lost"] else "")
             + ". Best: " + (f"trial {best.number}, target validation accuracy {best.value:.2f}%." if best else "none yet."),
             ""]
    if s["rejected"]:
        lines += ["Rejected before training (not counted): " + ", ".join(f"{k} {v}" for k, v in sorted(s["rejected"].items()))
                  + ". Trial numbers are Optuna's, so each rejected graph leaves a gap in the table's numbers "
                  "(they are listed in trials.json).", ""]
    legend = ", ".join(f"{v} {k}" for k, v in letters.items())
    lines += [f"Gates: one group per source (label, then nodes 1..N), one letter per destination 1..N: {legend}; "
              "· no self edge. `*` marks a frozen (pre-trained) node.", "",
              "| trial | state | epochs | target val % | models | gates | time | note |",
              "|---:|---|---:|---:|---|---|---:|---|"]
    for r in rows:
        if r["state"] == "REJECTED":
            continue
        g = Graph.from_dict(r["graph"], check_models=False) if r["graph"] else None
        models, gates = _compact(g, letters) if g else ("", "")
        acc = r["value"] if r["value"] is not None else r["last_val_acc"]
        lines.append(f"| {r['number']} | {r['state']} | {r['epochs']} | {'' if acc is None else f'{acc:.2f}'} | "
                     f"{models} | `{gates}` | {format_duration(r['time_s'], compact=True) if r['time_s'] is not None else ''} | "
                     f"{r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _savefig(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_history(rows: list[dict], path: Path) -> Path:
    """Write :func:`history_figure` to ``path``."""
    return _savefig(history_figure(rows), path)


def history_figure(rows: list[dict]) -> Any:
    """Target validation accuracy per trial (complete: blue; pruned: grey at their last epoch), the best so far
    up to the last trial, and the winner marked with its number."""
    from matplotlib.figure import Figure  # local: matplotlib is slow to import, only plots need it

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["last_val_acc"] is not None]
    if pruned:
        ax.scatter([r["number"] for r in pruned], [r["last_val_acc"] for r in pruned], s=12, c="#aaaaaa",
                   marker="x", label="pruned (last epoch)")
    if done:
        ax.scatter([r["number"] for r in done], [r["value"] for r in done], s=18, c="#1f77b4", label="complete")
        xs, ys, best = [], [], float("-inf")
        for r in sorted(done, key=lambda r: r["number"]):
            best = max(best, r["value"])
            xs.append(r["number"])
            ys.append(best)
        last = max(r["number"] for r in rows if r["state"] != "REJECTED")
        if last > xs[-1]:  # the best so far holds until the last trial
            xs.append(last)
            ys.append(ys[-1])
        ax.step(xs, ys, where="post", c="#d62728", label="best so far")
        win = max(done, key=lambda r: (r["value"], -r["number"]))
        ax.scatter([win["number"]], [win["value"]], s=90, facecolors="none", edgecolors="#d62728", linewidths=1.5,
                   zorder=5)
        ax.annotate(f"trial {win['number']}: {win['value']:.1f} %", (win["number"], win["value"]),
                    xytext=(8, -6), textcoords="offset points", ha="left", va="top", color="#d62728", fontsize=9)
    from matplotlib.ticker import MaxNLocator  # local: matplotlib is slow to import, only plots need it

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("target validation accuracy (%)")
    ax.set_title("Optimisation history")
    if done or pruned:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return fig


BEST_COLOURS = ("#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def plot_intermediate(rows: list[dict], path: Path, *, rungs: list[int], best: int = 3) -> Path:
    """Write :func:`intermediate_figure` to ``path``."""
    return _savefig(intermediate_figure(rows, rungs=rungs, best=best), path)


def intermediate_figure(rows: list[dict], *, rungs: list[int], best: int = 3) -> Any:
    """The target's validation accuracy after every epoch, one line per trial; dotted lines at the rungs.

    The ``best`` complete trials are coloured and named in a legend outside the axes; pruned trials end in
    a marker drawn over the rung lines.
    """
    from matplotlib.figure import Figure  # local: matplotlib is slow to import, only plots need it
    from matplotlib.lines import Line2D  # local: matplotlib is slow to import, only plots need it

    fig = Figure(figsize=(9.5, 4.5))
    ax = fig.subplots()
    ranked = sorted((r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None),
                    key=lambda r: (-r["value"], r["number"]))[:best]
    colour = {r["number"]: c for r, c in zip(ranked, BEST_COLOURS)}
    shown = 0
    handles = []
    kinds = set()  # the kinds of line drawn, so that the legend names no kind that is absent
    for r in rows:
        if not r["intermediate"] or r["state"] == "REJECTED":
            continue
        xs = list(r["intermediate"])
        ys = [r["intermediate"][x] for x in xs]
        if r["number"] in colour:
            continue  # drawn last, on top
        kinds.add(r["state"] if r["state"] in ("COMPLETE", "PRUNED") else "OTHER")
        style = {"COMPLETE": dict(c="#1f77b4", alpha=0.6, lw=1.0), "PRUNED": dict(c="#999999", alpha=0.5, lw=0.8)}.get(
            r["state"], dict(c="#ff7f0e", alpha=0.7, lw=1.0))
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, zorder=3, **style)
        if r["state"] == "PRUNED":
            ax.plot(xs[-1:], ys[-1:], marker="x", ms=6, c="#555555", ls="none", zorder=4)
        shown += 1
    for r in ranked:
        xs = list(r["intermediate"])
        ys = [r["intermediate"][x] for x in xs]
        line, = ax.plot(xs, ys, c=colour[r["number"]], lw=2.0, marker="o" if len(xs) < 30 else None, ms=3, zorder=6,
                        label=f"trial {r['number']}: {r['value']:.1f} %")
        handles.append(line)
        shown += 1
    for x in rungs:
        ax.axvline(x, ls=":", c="#cc0000", lw=0.8, alpha=0.6, zorder=1)
        kinds.add("RUNG")
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter  # local: only plots need matplotlib

    top = max([max(r["intermediate"]) for r in rows if r["intermediate"]] + rungs + [1])
    ax.xaxis.set_major_locator(FixedLocator(sorted({2 ** k for k in range(int(top).bit_length() + 1) if 2 ** k <= top}
                                                   | {top})))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("epoch")
    ax.set_ylabel("target validation accuracy (%)")
    ax.set_title("Target validation accuracy after each epoch")
    handles += [h for kind, h in (
        ("COMPLETE", Line2D([], [], c="#1f77b4", lw=1.0, label="other complete")),
        ("PRUNED", Line2D([], [], c="#999999", lw=0.8, marker="x", mec="#555555", label="pruned (x: where)")),
        ("OTHER", Line2D([], [], c="#ff7f0e", lw=1.0, label="running / failed")),
        ("RUNG", Line2D([], [], c="#cc0000", ls=":", lw=0.8, label="rung (pruning decision)"))) if kind in kinds]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                  title="best trials" if ranked else None, title_fontsize=8)
    if not shown:
        ax.text(0.5, 0.5, "no epoch reported yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3, zorder=0)
    return fig


def rung_epochs(spec: dict[str, Any]) -> list[int]:
    """Epochs at which the pruner decides, below the epoch budget."""
    return budget_rungs(int(spec["epochs"]), int(spec["min_resource"]), int(spec["reduction_factor"]),
                        int(spec["min_early_stopping_rate"]))


def _write_graph(graph: Graph, folder: Path, title: str, accuracies: Optional[list[float]],
                 skipped: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = [graph.save(folder / "graph.yaml")]
    accs = accuracies if accuracies and len(accuracies) == graph.num_nodes else None
    written += graph.draw(folder / "graph", title=title, accuracies=accs, on_png_skipped=skipped.append)
    return written


def export_study(study: Any, out: str | os.PathLike, *, top: int = 5, url: str = "") -> ExportResult:
    """Write the export files of ``study`` into ``out`` (see the module's docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = study.user_attrs.get(SPEC_ATTR)
    space = SearchSpace.from_dict(spec) if spec else None
    trials = study.get_trials(deepcopy=False)
    budget = int(study.user_attrs.get(BUDGET_ATTR, len(trials)))
    book = Ledger(trials, budget)
    rows = [_row(t, book) for t in book.trials]
    result = ExportResult(summary=book.summary(), files=[])

    atomic_write_json(out / "trials.json", {"study": study.study_name, "summary": book.summary(), "spec": spec,
                                            "trials": rows})
    atomic_write_text(out / "trials.md", _table(rows, book, study, url, space))
    result["files"] += [out / "trials.json", out / "trials.md"]
    result["files"].append(plot_history(rows, out / "history.png"))
    result["files"].append(plot_intermediate(rows, out / "intermediate.png", rungs=rung_epochs(spec) if spec else []))

    ranked = sorted((t for t in book.trials if t.state == TrialState.COMPLETE and t.value is not None
                     and ATTR_REJECTED not in t.user_attrs), key=lambda t: (-t.value, t.number))[:max(0, top)]
    top_dir = out / "top"
    if top_dir.exists():
        shutil.rmtree(top_dir)  # the ranking changes while a search runs
    result["top"] = []
    skipped: list[str] = []  # why graph PNGs were not drawn (reported once)
    for rank, t in enumerate(ranked, start=1):
        graph = _graph_of(t, space)
        if graph is None:
            continue
        title = f"#{rank}: trial {t.number}, target val {t.value:.2f}%"
        result["files"] += _write_graph(graph, top_dir / f"{rank}-trial{t.number}", title, t.user_attrs.get("val_acc"),
                                        skipped)
        result["top"].append({"rank": rank, "trial": t.number, "value": t.value, "frozen": bool(graph.frozen),
                              "time_s": t.user_attrs.get("time_s"), "packed": "data_seed" in t.user_attrs})
        if rank == 1:
            best_dir = out / "best"
            result["files"] += _write_graph(graph, best_dir, title, t.user_attrs.get("val_acc"), skipped)
            row = _row(t, book)
            try:  # the trial's own lone-run command (its folder's trial.json), as every trial.json holds it
                row["replay"] = json.loads((trial_dir(out, t.number) / "trial.json").read_text())["replay"]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a trial of an older version, or its folder gone
            atomic_write_json(best_dir / "trial.json", row)
    result["notes"] = list(dict.fromkeys(skipped))[:1]
    return result
