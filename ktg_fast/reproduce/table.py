"""The reproduction's results: Tables 1 and 2 in the paper's layout (``results.md``), the same as data
(``results.json``) and as a bar chart (``results.png``), ours beside the paper's figures."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..gates import gate_codes
from ..graph import Graph, frozen_nodes
from ..io import atomic_write_json, atomic_write_text
from ..report import mean_std, plural, seeds_phrase
from .paper import ROLE_NAMES, ROLES, TABLE1_DATASETS, TABLE2_DATASET, Figure, model_label
from .plan import Plan

__all__ = ["RowResult", "collect", "render", "draw_chart", "write_results", "DATASET_NAMES",
           "DASH", "SAME_RUN"]

DASH = "–"
SAME_RUN = "†"  # marks a row whose run an earlier row of its table has: their stand-ins coincide
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tiny-imagenet": "Tiny-ImageNet",
                 "fashion-mnist": "Fashion-MNIST", "synthetic": "synthetic"}


@dataclass
class RowResult:
    """A row with our accuracies of its target over the seeds (empty until its run finished)."""

    table: int
    key: str
    method: str
    models: list[str]
    values: list[float]
    paper: Optional[Figure]
    status: str  # done | pending | cited
    run: Optional[str] = None
    note: str = ""
    same_as: Optional[str] = None  # key of the earlier row of the table filled by the same run (Plan.same_as)

    @property
    def ours(self) -> Optional[tuple[float, float]]:
        return mean_std(self.values) if self.values else None

    @property
    def delta(self) -> Optional[float]:
        ours = self.ours
        return None if ours is None or self.paper is None else ours[0] - self.paper.mean


def _over_seeds(seeds: Sequence[int]) -> str:
    """What the accuracies are, as ``train``'s results.md says it (:func:`ktg_fast.report.seeds_phrase`)."""
    return ("mean ± std " if len(seeds) > 1 else "") + seeds_phrase(seeds)


def _target_accuracies(finals: Sequence[dict]) -> tuple[list[float], list[str]]:
    """Node 1's (the target's) test accuracy per seed, and the graph's models (``*``: frozen)."""
    graph = finals[0]["graph"]
    target = int(graph.get("target", 1))
    frozen = set(frozen_nodes(gate_codes(graph["gates"])))
    models = [n["model"] + ("*" if t in frozen else "") for t, n in enumerate(graph["nodes"], start=1)]
    return [float(f["test_acc"][target - 1]) for f in finals], models


def collect(plan: Plan) -> list[RowResult]:
    """Every row with what its run has finished so far."""
    out = []
    for row in plan.rows:
        res = RowResult(row.table, row.key, row.method, list(row.models), [], row.figure,
                        "cited" if row.run is None else "pending", row.run, row.note)
        same = plan.same_as(row)
        res.same_as = same.key if same is not None else None
        run = plan.runs.get(row.run) if row.run else None
        finals = run.finals() if run is not None else None
        if finals:
            res.values, res.models = _target_accuracies(finals)
            res.status = "done"
        elif run is not None and run.search is not None and (run.search / "best" / "graph.yaml").is_file():
            g = Graph.load(run.search / "best" / "graph.yaml")
            res.models = [n.model + ("*" if g.is_frozen(t) else "") for t, n in enumerate(g.nodes, start=1)]
        out.append(res)
    return out


def _acc(res: RowResult) -> str:
    if res.status == "cited":
        return "not run"
    ours = res.ours
    if ours is None:
        return "pending"
    return f"{ours[0]:.2f} ± {ours[1]:.2f}" if len(res.values) > 1 else f"{ours[0]:.2f}"  # one seed: no std


def _method(res: RowResult) -> str:
    """The row's method (Table 2) or model role (Table 1), marked when an earlier row has its run."""
    return res.method + (f" {SAME_RUN}" if res.same_as else "")


def _same_run_note(rows: Sequence[RowResult]) -> list[str]:
    """The footnote of a table with rows marked :data:`SAME_RUN` (none when it has none)."""
    if not any(r.same_as for r in rows):
        return []
    return ["", f"{SAME_RUN} Filled by the same sub-run as an earlier row: the stand-ins of --models coincide, so "
                "the paper's different experiments are one here; each row keeps the paper's own figure."]


def _paper(res: RowResult) -> str:
    return DASH if res.paper is None else res.paper.text()


def _delta(res: RowResult) -> str:
    d = res.delta
    return DASH if d is None else f"{d:+.2f}"


def render(plan: Plan, results: Sequence[RowResult]) -> str:
    """``results.md``: the settings, Table 1, Table 2 and the searched graphs."""
    s = plan.settings
    ds = DATASET_NAMES.get(s.dataset, s.dataset)
    roles = ", ".join(f"{ROLE_NAMES[r]} → {model_label(m)}" for r, m in zip(ROLES, s.models))
    subset = f", the first {s.train_subset} training images" if s.train_subset else ""
    evals = f", evaluated on the first {s.eval_subset} test images" if s.eval_subset else ""
    t1_paper = f"Paper ({ds})" if s.dataset in TABLE1_DATASETS else "Paper"
    t2_paper = f"Paper ({DATASET_NAMES[TABLE2_DATASET]})" if s.dataset == TABLE2_DATASET else "Paper"
    searches = [run for run in plan.runs.values() if run.kind == "search"]
    retrain_on = f"the same {s.train_subset} training images" if s.train_subset else "the whole training set"
    search = (f"; graph searches of {plural(s.trials, 'trial')} on the search's validation split, their best graphs "
              f"retrained from scratch on {retrain_on}") if searches else ""
    lines = [f"# Knowledge transfer graph: Tables 1 and 2 reproduced on {ds}", "",
             f"Test accuracy (%) of node 1, {_over_seeds(s.seeds)}; {plural(s.epochs, 'epoch')}"
             f"{subset}{evals}{search}. Models: {roles}. The paper: 200 epochs, five runs, 1,500 trials; its "
             f"figures are for CIFAR (Table 2: CIFAR-100 only), {DASH} where it has none. Δ = ours − paper. `*` a "
             "pre-trained (frozen) node; `**` cited by the paper from another paper."]
    table1 = [r for r in results if r.table == 1]
    if table1:
        lines += ["", "## Table 1: vanilla models", "", f"| Model | Ours | {t1_paper} | Δ |", "|---|---:|---:|---:|"]
        lines += [f"| {_method(r)} ({model_label(r.models[0])}) | {_acc(r)} | {_paper(r)} | {_delta(r)} |"
                  for r in table1]
        lines += _same_run_note(table1)
    table2 = [r for r in results if r.table == 2]
    if table2:
        lines += ["", "## Table 2: comparison with conventional methods", "",
                  f"| Method | Node 1 | Node 2 | Node 3 | Node 4 | Ours: accuracy (node 1) | {t2_paper} | Δ |",
                  "|---|---|---|---|---|---:|---:|---:|"]
    for r in table2:
        nodes = [model_label(m) if m != "?" else "?" for m in r.models] + [DASH] * (4 - len(r.models))
        cells = [r.note, "", "", ""] if r.note else nodes[:4]
        lines.append(f"| {_method(r)} | {' | '.join(cells)} | {_acc(r)} | {_paper(r)} | {_delta(r)} |")
    lines += _same_run_note(table2)
    if searches:
        lines += ["", "## Searched graphs", ""]
        for run in searches:
            rel = run.out.relative_to(s.out) if run.out.is_relative_to(s.out) else run.out
            summary = run.search_summary()
            best = (f"best trial {summary['best_trial']}, target validation accuracy {summary['best_value']:.2f} %"
                    if summary and summary.get("best_value") is not None else "not finished")
            lines.append(f"- {run.label}: {best}; graph `{rel}/best/graph.yaml`"
                         + (f" ![{run.label}]({rel}/best/graph.png)" if (run.out / "best" / "graph.png").is_file()
                            else "") + f", trials `{rel}/trials.md`")
    lines += ["", "Commands: `commands.sh` (what ran when: `commands.log`); runs: `runs/`; chart: `results.png`.", ""]
    return "\n".join(lines)


def draw_chart(results: Sequence[RowResult], path: Path, title: str = "") -> Path:
    """Bars of our accuracy (with the std over seeds) beside the paper's, one panel per table."""
    from matplotlib.figure import Figure as MplFigure  # local: matplotlib is slow to import

    nan = float("nan")
    groups = [(name, [r for r in results if r.table == t and r.status != "cited"])
              for t, name in ((1, "Table 1: vanilla"), (2, "Table 2: node 1 (target)"))]
    groups = [g for g in groups if g[1]]
    fig = MplFigure(figsize=(3 + 0.9 * sum(len(rows) for _, rows in groups), 4.8))
    axes = fig.subplots(1, len(groups), squeeze=False,
                        gridspec_kw={"width_ratios": [len(rows) + 1 for _, rows in groups]})[0]
    for ax, (name, rows) in zip(axes, groups):
        xs = list(range(len(rows)))
        has_paper = any(r.paper for r in rows)
        width, shift = (0.4, 0.2) if has_paper else (0.6, 0.0)
        ax.bar([x - shift for x in xs], [r.ours[0] if r.ours else nan for r in rows], width,
               yerr=[r.ours[1] if r.ours else 0.0 for r in rows], capsize=3, color="#1f77b4", label="ours")
        if has_paper:
            ax.bar([x + shift for x in xs], [r.paper.mean if r.paper else nan for r in rows], width,
                   yerr=[(r.paper.std or 0.0) if r.paper else 0.0 for r in rows], capsize=3, color="#bbbbbb",
                   hatch="//", label="paper")
        labels = [f"{_method(r)}\n" + ("+".join(model_label(m) for m in r.models) if r.table == 2 else
                                     model_label(r.models[0])) for r in rows]
        ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
        vals = [v for r in rows for v in ((r.ours[0] if r.ours else None), (r.paper.mean if r.paper else None))
                if v is not None]
        if vals:
            ax.set_ylim(max(0.0, min(vals) - 10), min(100.0, max(vals) + 5))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name if has_paper else f"{name} (no paper figures)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def write_results(plan: Plan, *, chart: bool = True) -> list[Path]:
    """Write ``results.md``, ``results.json`` and (with ``chart``) ``results.png`` into the reproduction's folder."""
    out = plan.settings.out
    results = collect(plan)
    md = atomic_write_text(out / "results.md", render(plan, results))
    data = [{**asdict(r), "paper": asdict(r.paper) if r.paper else None, "ours": r.ours, "delta": r.delta}
            for r in results]
    js = atomic_write_json(out / "results.json", {"dataset": plan.settings.dataset, "rows": data})
    if not chart:
        return [Path(md), Path(js)]
    png = draw_chart(results, out / "results.png",
                     f"{DATASET_NAMES.get(plan.settings.dataset, plan.settings.dataset)}: ours vs the paper")
    return [Path(md), Path(js), png]
