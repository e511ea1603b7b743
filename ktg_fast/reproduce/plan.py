"""The reproduction's plan: the rows of Tables 1 and 2 and the sub-runs (exact commands) that fill them.

Every sub-run is one of the project's own command lines, so it resumes itself when run again:

- ``train``: ``python -m ktg_fast.train`` of a preset or graph over the seeds (vanilla, KD, DML), finished
  when its ``results.json`` holds every seed;
- ``pretrain``: ``python -m ktg_fast.pretrain`` of a teacher, finished when the teacher checkpoint exists
  (written atomically after its last epoch);
- ``search``: ``python -m ktg_fast.search`` on the search's own split, then ``search export``, finished
  when the export's ``trials.json`` counts the whole budget and ``best/graph.yaml`` exists;
- ``retrain``: ``python -m ktg_fast.train --graph <search>/best/graph.yaml`` over the seeds, on the whole
  training set (as ``train``).

Runs are named after what they train (``dml-resnet8-wrn10_1``), so rows that map onto the same models
(stand-ins may coincide) share one run.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..graph import Graph, preset
from ..nodes import teacher_path
from ..recipe import TrainConfig
from ..search.budget import expected_epochs_per_trial
from ..search.config import SearchConfig
from ..search.space import DEFAULT_GATES
from .paper import (ROLE_NAMES, ROLES, TABLE2, Figure, Table2Row, base_role, frozen_role, model_label,
                    table1_figure, table2_figure)

__all__ = ["Settings", "Work", "Run", "Row", "Plan", "build_plan", "row_keys", "model_label", "settings_key",
           "SEARCH_VAL_DEFAULT"]

SEARCH_VAL_DEFAULT = 0  # --val-size 0: the search's own default split


@dataclass(frozen=True)
class Settings:
    """What a reproduction runs: the dataset, the models standing for the paper's three, the node counts
    of Table 2, seeds, epochs, trials per search, and the flags forwarded to the sub-commands."""

    dataset: str
    out: Path
    models: tuple[str, str, str]
    nodes: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: int
    trials: int
    train_subset: Optional[int] = None
    eval_subset: Optional[int] = None
    val_size: int = SEARCH_VAL_DEFAULT
    batch_size: int = TrainConfig.batch_size
    recipe: tuple[str, ...] = ()  # data and recipe flags changing results, for every train, pretrain and search
    local: tuple[str, ...] = ()  # flags of this machine (--device, --step, --loader, --data-root): may change
    train_only: tuple[str, ...] = ()  # flags only train and pretrain take (e.g. --download)
    search_only: tuple[str, ...] = ()  # flags only the search takes (e.g. --workers)
    rows: Optional[tuple[str, ...]] = None  # keys of the rows to run (None: every row); see row_keys()
    cache: Optional[Path] = None  # --compile-cache (default <out>/inductor-cache, shared by every sub-run)
    python: str = sys.executable

    @property
    def common(self) -> tuple[str, ...]:
        """Flags every train, pretrain and search command takes: the recipe's, then this machine's."""
        return (*self.recipe, *self.local)

    @property
    def teachers(self) -> Path:
        return self.out / "teachers"

    @property
    def compile_cache(self) -> Path:
        return self.cache if self.cache is not None else self.out / "inductor-cache"

    def role_model(self, role: str) -> str:
        """The model standing for one of the paper's :data:`~.paper.ROLES`."""
        return self.models[ROLES.index(base_role(role))]

    def search_val_size(self) -> int:
        """Validation images the search holds out (``--val-size``, else the search's default for the dataset)."""
        return SearchConfig(out="", dataset=self.dataset, val_size=self.val_size or None).resolved_val_size()


@dataclass(frozen=True)
class Work:
    """What a sub-run trains, for estimates and progress: ``trainings`` runs of ``epochs`` epochs each, every
    step training ``nodes`` (each a tuple of the models it may be: a search averages over them) and
    running ``frozen`` forwards, on the full split (``train``) or the search's (``search``)."""

    trainings: float
    epochs: float
    nodes: tuple[tuple[str, ...], ...]
    frozen: tuple[str, ...] = ()
    split: str = "train"
    processes: int = 1
    extra: tuple["Work", ...] = ()

    @property
    def total_epochs(self) -> float:
        return self.trainings * self.epochs


@dataclass
class Run:
    """One sub-run: its folder, the exact commands (argv lists) and how to tell that it finished."""

    id: str
    kind: str  # train | pretrain | search | retrain
    label: str
    out: Path
    commands: list[list[str]]
    work: Work
    seeds: tuple[int, ...] = ()
    epochs: int = 0
    teacher: Optional[Path] = None  # pretrain: the checkpoint it writes
    search: Optional[Path] = None  # retrain: the search whose best graph it trains
    graph_file: Optional[tuple[Path, Graph]] = None  # written before the command runs
    trials: int = 0

    def finals(self) -> Optional[list[dict]]:
        """The ``final.json`` records of a finished train/retrain run (from its ``results.json``), else None."""
        path = self.out / "results.json"
        try:
            finals = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(finals, list) or not all(isinstance(f, dict) for f in finals) or \
                sorted(f.get("seed", -1) for f in finals) != sorted(self.seeds):
            return None
        if any(f.get("epochs") != self.epochs for f in finals):
            return None
        return finals

    def search_summary(self) -> Optional[dict]:
        """The study's counts from the search export's ``trials.json`` (None before any export)."""
        try:
            return json.loads((self.out / "trials.json").read_text())["summary"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def finished(self) -> bool:
        """Whether the run's own finished marker is there (see the module's docstring)."""
        if self.kind == "pretrain":
            return self.teacher is not None and self.teacher.is_file()
        if self.kind == "search":
            s = self.search_summary()
            return bool(s) and s.get("done", 0) >= self.trials and (self.out / "best" / "graph.yaml").is_file()
        return self.finals() is not None

    def started(self) -> bool:
        return self.out.exists() and any(self.out.iterdir())

    def epochs_done(self) -> int:
        """Epochs trained so far (metrics records), for progress; never read for decisions."""
        if self.kind == "search":
            files = list((self.out / "trials").glob("*/metrics.jsonl"))
        else:
            files = list(self.out.glob("metrics.jsonl")) + list(self.out.glob("seed*/metrics.jsonl"))
        n = 0
        for f in files:
            try:
                n += sum(1 for line in f.read_text().splitlines() if line.strip())
            except OSError:
                continue
        return n


@dataclass
class Row:
    """One row of Table 1 or 2: its method, its nodes (our models), the run filling it, the paper's figure."""

    table: int
    key: str
    method: str
    roles: tuple[str, ...]
    models: tuple[str, ...]  # our models, node 1 first; "*" marks a pre-trained node
    run: Optional[str]  # None: a row cited by the paper, not run here
    figure: Optional[Figure]
    note: str = ""

    @property
    def label(self) -> str:
        nodes = " + ".join(model_label(m) for m in self.models)
        return f"Table {self.table} · {self.method}" + (f" ({nodes})" if self.table == 1 else f": {nodes}")


@dataclass
class Plan:
    """The rows, and the runs in the order they run (each after the runs it needs)."""

    settings: Settings
    rows: list[Row] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)

    def add(self, run: Run) -> Run:
        return self.runs.setdefault(run.id, run)

    def same_as(self, row: Row) -> Optional[Row]:
        """The earlier row of ``row``'s table filled by the same run (its stand-ins coincide, as with
        ``--models resnet8 resnet8 resnet8``: two of the paper's experiments are one here), else None."""
        if row.run is None:
            return None
        for r in self.rows:
            if r is row:
                return None
            if r.table == row.table and r.run == row.run:
                return r
        return None

    def row_labels(self, run_id: str) -> list[str]:
        """Labels of the rows ``run_id`` fills, each once (rows that coincide have the same label)."""
        return list(dict.fromkeys(r.label for r in self.rows if r.run == run_id))

    def teacher_run(self, model: str) -> Run:
        """The run pre-training ``model`` as a teacher on the whole training set (added when new)."""
        s = self.settings
        out = s.out / "runs" / f"teacher-{model}"
        cmd = _cmd(s, "ktg_fast.pretrain", "--model", model, "--dataset", s.dataset, "--epochs", str(s.epochs),
                   "--teachers", str(s.teachers), "--out", str(out), "--compile-cache", str(s.compile_cache),
                   *s.common, *s.train_only)
        return self.add(Run(f"teacher-{model}", "pretrain", f"teacher {model_label(model)}", out, [cmd],
                            Work(1, s.epochs, ((model,),)), teacher=teacher_path(s.teachers, s.dataset, model),
                            epochs=s.epochs))


def _cmd(s: Settings, module: str, *args: str) -> list[str]:
    return [s.python, "-m", module, *args]


def _train_run(plan: Plan, run_id: str, label: str, graph_args: Sequence[str], nodes: Sequence[str], *,
               frozen: Sequence[str] = (), kind: str = "train", search: Optional[Path] = None,
               graph_file: Optional[tuple[Path, Graph]] = None) -> Run:
    s = plan.settings
    out = s.out / "runs" / run_id
    cmd = _cmd(s, "ktg_fast.train", *graph_args, "--dataset", s.dataset, "--epochs", str(s.epochs),
               "--seeds", *map(str, s.seeds), "--teachers", str(s.teachers), "--out", str(out), "--resume",
               "--compile-cache", str(s.compile_cache), *s.common, *s.train_only)
    work = Work(len(s.seeds), s.epochs, tuple((m,) if isinstance(m, str) else tuple(m) for m in nodes), tuple(frozen))
    return plan.add(Run(run_id, kind, label, out, [cmd], work, seeds=s.seeds, epochs=s.epochs, search=search,
                        graph_file=graph_file))


def _search_runs(plan: Plan, n: int) -> Run:
    """The search of ``n`` nodes, then the retraining of its best graph; returns the retraining run."""
    s = plan.settings
    target, models = s.models[0], tuple(dict.fromkeys(s.models))
    out = s.out / "runs" / f"search-{n}nodes"
    search = _cmd(s, "ktg_fast.search", "--out", str(out), "--nodes", str(n), "--target", target,
                  "--models", *models, "--dataset", s.dataset, "--trials", str(s.trials), "--epochs", str(s.epochs),
                  "--teachers", str(s.teachers), "--compile-cache", str(s.compile_cache), *s.common, *s.search_only)
    export = _cmd(s, "ktg_fast.search", "export", "--out", str(out))
    per_trial = expected_epochs_per_trial(s.epochs, SearchConfig.min_resource, SearchConfig.reduction_factor,
                                          SearchConfig.min_early_stopping_rate)
    # A trial's auxiliary node is frozen when its n inputs are all cutoff; its teacher is pre-trained once.
    p_frozen = (1 / len(DEFAULT_GATES)) ** n / len(models)
    teachers = tuple(Work(1 - (1 - p_frozen) ** (s.trials * (n - 1)), s.epochs, ((m,),), split="search",
                          processes=0) for m in models)
    work = Work(s.trials, per_trial, ((target,),) + (models,) * (n - 1), split="search", processes=2, extra=teachers)
    plan.add(Run(out.name, "search", f"search of {n}-node graphs", out, [search, export], work, trials=s.trials))
    return _train_run(plan, f"ours-{n}nodes", f"best {n}-node graph", ["--graph", str(out / "best" / "graph.yaml")],
                      [(target,)] + [models] * (n - 1), kind="retrain", search=out)


def _table2_run(plan: Plan, prow: Table2Row) -> Optional[Run]:
    s = plan.settings
    models = [s.role_model(r) for r in prow.nodes]
    if prow.kind == "vanilla":
        return _train_run(plan, f"vanilla-{models[0]}", f"vanilla {model_label(models[0])}",
                          ["--graph", "vanilla", "--model", models[0]], models)
    if prow.kind == "kd":
        student, teacher = models
        plan.teacher_run(teacher)
        return _train_run(plan, f"kd-{student}-{teacher}", f"KD {model_label(student)} <- {model_label(teacher)}*",
                          ["--graph", "kd", "--model", student, "--teacher", teacher], [student], frozen=[teacher])
    if prow.kind == "dml":
        run_id = "dml-" + "-".join(models)
        label = "DML " + " + ".join(model_label(m) for m in models)
        if len(set(models)) == 1:
            return _train_run(plan, run_id, label, ["--graph", "dml", "--nodes", str(len(models)), "--model",
                                                    models[0]], models)
        path = s.out / "graphs" / f"{run_id}.yaml"
        return _train_run(plan, run_id, label, ["--graph", str(path)], models,
                          graph_file=(path, preset("dml", models=models)))
    if prow.kind == "ours":
        return _search_runs(plan, len(prow.nodes))
    return None  # cited rows are not run


def row_keys() -> list[str]:
    """Keys ``--rows`` takes: Table 1's by model role (``resnet32``...), then Table 2's (``dml2``, ``ours3``...)."""
    return [*ROLES, *(r.key for r in TABLE2 if r.kind != "cited")]


def build_plan(s: Settings) -> Plan:
    """Rows of Table 1 (each model alone) and of Table 2 (the node counts in ``s.nodes``), and their runs;
    only the rows ``s.rows`` names when it is set (the paper's cited rows come with the 4-node rows, unpicked)."""
    plan = Plan(s)
    for role in ROLES:
        if s.rows is not None and role not in s.rows:
            continue
        model = s.role_model(role)
        run = _train_run(plan, f"vanilla-{model}", f"vanilla {model_label(model)}",
                         ["--graph", "vanilla", "--model", model], [model])
        plan.rows.append(Row(1, role, ROLE_NAMES[role], (role,), (model,), run.id,
                             table1_figure(role, s.dataset)))
    for prow in TABLE2:
        if prow.kind != "vanilla" and len(prow.nodes) not in s.nodes:
            continue
        if s.rows is not None and prow.key not in s.rows:
            continue
        run = _table2_run(plan, prow)
        models = tuple(s.role_model(r) + ("*" if frozen_role(r) else "") for r in prow.nodes)
        if prow.kind == "ours":
            models = (models[0],) + ("?",) * (len(models) - 1)  # known once the search has found its graph
        plan.rows.append(Row(2, prow.key, prow.method, prow.nodes, models, run.id if run else None,
                             table2_figure(prow, s.dataset), prow.note))
    return plan


def settings_key(s: Settings) -> dict[str, Any]:
    """What a rerun in the same ``--out`` must repeat (``--nodes`` and ``--rows`` may change: they pick rows)."""
    return {"dataset": s.dataset, "models": list(s.models), "seeds": list(s.seeds), "epochs": s.epochs,
            "trials": s.trials, "train_subset": s.train_subset, "eval_subset": s.eval_subset,
            "val_size": s.val_size, "flags": list(s.recipe)}
