"""Result tables: each node's accuracy over seeds as mean +- std (the paper's Table 2 form)."""
from __future__ import annotations

import statistics
from typing import Sequence

from .gates import gate_codes
from .graph import frozen_nodes

__all__ = ["mean_std", "plural", "seeds_phrase", "seeds_table"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def plural(count: float, word: str) -> str:
    """``1 trial``, ``3 epochs``, ``0.5 epochs``."""
    return f"{count:g} {word}{'' if count == 1 else 's'}"


def seeds_phrase(seeds: Sequence[int]) -> str:
    """What a table's accuracies are taken over: ``over seeds 0, 1, 2``, or ``of seed 0 (one seed: no std)``
    (the cells of one seed then show no std)."""
    listed = ", ".join(map(str, seeds))
    return f"over seeds {listed}" if len(seeds) > 1 else f"of seed {listed} (one seed: no std)"


def seeds_table(finals: Sequence[dict], *, metric: str = "test_acc") -> str:
    """Markdown table of each node's final ``metric`` over runs (one ``final.json`` record per seed)."""
    if not finals:
        raise ValueError("no finished runs to tabulate")
    graph = finals[0]["graph"]
    frozen_set = set(frozen_nodes(gate_codes(graph["gates"])))
    frozen = [t in frozen_set for t in range(1, len(graph["nodes"]) + 1)]
    over = seeds_phrase([f["seed"] for f in finals])
    lines = [f"| node | model | role | {metric} (%) {over} |", "|---|---|---|---|"]
    for t, node in enumerate(graph["nodes"], start=1):
        vals = [f[metric][t - 1] for f in finals if metric in f]
        mu, sd = mean_std(vals)
        role = "target" if t == graph.get("target", 1) else ("frozen" if frozen[t - 1] else "auxiliary")
        cell = f"{mu:.2f} +- {sd:.2f}" if len(vals) > 1 else f"{mu:.2f}"
        lines.append(f"| {t} | {node['model']} | {role} | {cell} |")
    return "\n".join(lines) + "\n"
