"""The knowledge transfer graph: nodes, gate matrix, temperature.

Node 0 is the label; nodes 1..M are networks.  ``gates[s][t]`` is the gate of
edge s -> t (source row, destination column).  A node whose incoming gates
are all cutoff is *frozen*: it is loaded from a checkpoint and never trained.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import gates as _gates
from .io import atomic_write_text

__all__ = ["Graph", "GraphError", "Node", "preset", "PRESETS", "PRETRAINED"]

# A frozen node's checkpoint may be this word: the trainer then looks for
# <teacher dir>/<dataset>/<model>.pt, written by `python -m ktg_fast.pretrain`.
PRETRAINED = "pretrained"


class GraphError(ValueError):
    """A graph file or object that breaks a rule; the message names the node, edge or value."""


@dataclass
class Node:
    """A network node: its model's registry name and an optional checkpoint.

    ``checkpoint`` is a path, :data:`PRETRAINED` (look up the teacher folder),
    or ``None``.  Frozen nodes need one; trainable nodes start from it if set.
    """

    model: str
    checkpoint: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model}
        if self.checkpoint is not None:
            d["checkpoint"] = self.checkpoint
        return d


@dataclass
class Graph:
    """A knowledge transfer graph.

    Attributes:
        nodes: network nodes 1..M (``nodes[i]`` is node i+1).
        gates: (M+1) x (M+1) gate names, ``gates[source][destination]``.
        temperature: T of the KL edges.
        target: the node whose accuracy a search optimises (1 by default).
    """

    nodes: list[Node]
    gates: list[list[str]]
    temperature: float = 1.0
    target: int = 1
    # Models are checked against the registry unless a caller opts out
    # (graphs naming models registered later, e.g. in a user's script).
    check_models: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.nodes = [n if isinstance(n, Node) else Node(**n) for n in self.nodes]
        self.gates = [[_gate_name(g, s, t) for t, g in enumerate(row)] for s, row in enumerate(self.gates)]
        self.temperature = float(self.temperature)
        self.validate()

    # ------------------------------------------------------------------ queries
    @property
    def num_nodes(self) -> int:
        """M, the number of network nodes (the label not counted)."""
        return len(self.nodes)

    def gate_codes(self) -> torch.Tensor:
        """The gate matrix as an int64 tensor of gate codes (for ``graph_loss``)."""
        return _gates.gate_codes(self.gates)

    def is_frozen(self, t: int) -> bool:
        """Whether network node t (1-based) has only cutoff inputs."""
        return all(self.gates[s][t] == "cutoff" for s in range(self.num_nodes + 1) if s != t)

    @property
    def frozen(self) -> list[int]:
        """1-based indices of frozen nodes."""
        return [t for t in range(1, self.num_nodes + 1) if self.is_frozen(t)]

    @property
    def trainable(self) -> list[int]:
        """1-based indices of trainable nodes."""
        return [t for t in range(1, self.num_nodes + 1) if not self.is_frozen(t)]

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`GraphError` naming the first node, edge or value at fault."""
        m = self.num_nodes
        if m < 1:
            raise GraphError("a graph needs at least one network node besides the label")
        if len(self.gates) != m + 1 or any(len(r) != m + 1 for r in self.gates):
            sizes = "x".join(str(len(r)) for r in self.gates[:1]) or "0"
            raise GraphError(
                f"gate matrix must be {m + 1}x{m + 1} for {m} network nodes plus the label, "
                f"got {len(self.gates)} rows (first row length {sizes})"
            )
        if not self.temperature > 0:
            raise GraphError(f"temperature must be positive, got {self.temperature}")
        for s in range(m + 1):
            if self.gates[s][0] != "cutoff":
                raise GraphError(f"gate[{s}][0] is {self.gates[s][0]!r}: nothing flows into the label node 0; use 'cutoff'")
        for t in range(1, m + 1):
            if self.gates[t][t] != "cutoff":
                raise GraphError(f"gate[{t}][{t}] is {self.gates[t][t]!r}: a node has no edge to itself; use 'cutoff'")
        if not 1 <= self.target <= m:
            raise GraphError(f"target node {self.target} does not exist: pick 1..{m}")
        if self.check_models:
            from .models import is_model

            for i, node in enumerate(self.nodes, start=1):
                if not is_model(node.model):
                    from .models import available_models

                    raise GraphError(
                        f"node {i}: unknown model {node.model!r}; known: {', '.join(available_models())}"
                    )
        if self.is_frozen(self.target):
            raise GraphError(
                f"target node {self.target} is frozen (all its incoming gates are cutoff): "
                "give it at least one non-cutoff input, e.g. gate[0][%d] = 'through'" % self.target
            )
        for t in self.frozen:
            if not self.nodes[t - 1].checkpoint:
                raise GraphError(
                    f"node {t} ({self.nodes[t - 1].model}) is frozen but has no checkpoint: set its "
                    f"checkpoint to a file or to '{PRETRAINED}' (then run `python -m ktg_fast.pretrain "
                    f"--model {self.nodes[t - 1].model} --dataset <dataset>`)"
                )

    # ----------------------------------------------------------------- file I/O
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the file format): temperature, target, nodes, gates."""
        return {
            "temperature": self.temperature,
            "target": self.target,
            "nodes": [n.to_dict() for n in self.nodes],
            "gates": [list(r) for r in self.gates],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, check_models: bool = True) -> "Graph":
        """Build and validate a graph from :meth:`to_dict`'s format."""
        if not isinstance(d, dict):
            raise GraphError(f"a graph must be a mapping with keys nodes, gates, temperature; got {type(d).__name__}")
        unknown = set(d) - {"temperature", "target", "nodes", "gates"}
        if unknown:
            raise GraphError(f"unknown graph keys {sorted(unknown)}; allowed: nodes, gates, temperature, target")
        for key in ("nodes", "gates"):
            if key not in d:
                raise GraphError(f"graph has no {key!r} entry")
        nodes = []
        for i, n in enumerate(d["nodes"], start=1):
            if isinstance(n, str):
                n = {"model": n}
            if not isinstance(n, dict) or "model" not in n:
                raise GraphError(f"node {i}: expected a mapping with a 'model' key, got {n!r}")
            extra = set(n) - {"model", "checkpoint"}
            if extra:
                raise GraphError(f"node {i}: unknown keys {sorted(extra)}; allowed: model, checkpoint")
            nodes.append(Node(str(n["model"]), None if n.get("checkpoint") is None else str(n["checkpoint"])))
        if not isinstance(d["gates"], list) or not all(isinstance(r, list) for r in d["gates"]):
            raise GraphError("gates must be a list of rows (one per source node, label first)")
        return cls(
            nodes=nodes,
            gates=d["gates"],
            temperature=d.get("temperature", 1.0),
            target=int(d.get("target", 1)),
            check_models=check_models,
        )

    def dumps(self, fmt: str = "yaml") -> str:
        """Serialise to YAML or JSON text."""
        d = self.to_dict()
        if fmt == "json":
            return json.dumps(d, indent=2) + "\n"
        if fmt == "yaml":
            import yaml

            # Gate rows on one line each read as a matrix.
            lines = [f"temperature: {self.temperature!r}", f"target: {self.target}", "nodes:"]
            lines += ["  - " + yaml.safe_dump(n, default_flow_style=True).strip() for n in d["nodes"]]
            lines.append("# gates[source][destination]; row and column 0 are the label")
            lines.append("gates:")
            lines += ["  - [" + ", ".join(r) + "]" for r in self.gates]
            return "\n".join(lines) + "\n"
        raise ValueError(f"unknown graph format {fmt!r}: use 'yaml' or 'json'")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the graph atomically; the suffix (.yaml/.yml/.json) picks the format."""
        path = Path(path)
        atomic_write_text(path, self.dumps(_format_of(path)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, check_models: bool = True) -> "Graph":
        """Read a YAML or JSON graph file; errors name the file and the fault."""
        path = Path(path)
        if not path.is_file():
            raise GraphError(f"graph file {str(path)!r} not found; give a preset name ({', '.join(PRESETS)}) or a path")
        text = path.read_text(encoding="utf-8")
        try:
            if _format_of(path) == "json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # parse errors carry line numbers; keep them
            raise GraphError(f"{path}: cannot parse: {e}") from None
        try:
            return cls.from_dict(data, check_models=check_models)
        except GraphError as e:
            raise GraphError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ drawing
    def to_dot(self, *, title: Optional[str] = None, accuracies: Optional[Sequence[float]] = None) -> str:
        """Graphviz DOT text in the paper's style.

        The target node is red, frozen nodes blue, edges labelled by gate,
        cutoff edges left out.  ``accuracies`` (one per network node) are
        printed in the node labels when given.
        """
        out = ["digraph KTG {", "  rankdir=LR;", '  node [shape=ellipse, style=filled, fillcolor="white", fontname="Helvetica"];']
        if title:
            out.append(f'  labelloc="t"; label="{title}";')
        out.append('  n0 [label="Label", shape=box, fillcolor="#dddddd"];')
        for i, node in enumerate(self.nodes, start=1):
            text = f"{i}: {node.model}"
            if accuracies is not None:
                text += f"\\n({accuracies[i - 1]:.2f})"
            if i == self.target:
                style = 'fillcolor="#f4a6a6", color="#c00000", penwidth=2'
            elif self.is_frozen(i):
                style = 'fillcolor="#a6c8f4", color="#0050c0"'
                text += "\\n(frozen)"
            else:
                style = 'fillcolor="white"'
            out.append(f'  n{i} [label="{text}", {style}];')
        for s in range(self.num_nodes + 1):
            for t in range(1, self.num_nodes + 1):
                g = self.gates[s][t]
                if s != t and g != "cutoff":
                    out.append(f'  n{s} -> n{t} [label="{g}"];')
        out.append("}")
        return "\n".join(out) + "\n"

    def draw(self, path: str | os.PathLike, **kw: Any) -> list[Path]:
        """Write ``<path>.dot`` and, when graphviz's ``dot`` is installed, ``<path>.png``."""
        base = Path(path).with_suffix("")
        dot_path = base.with_suffix(".dot")
        atomic_write_text(dot_path, self.to_dot(**kw))
        written = [dot_path]
        if shutil.which("dot"):
            png = base.with_suffix(".png")
            tmp = png.with_name(png.name + ".tmp")
            subprocess.run(["dot", "-Tpng", str(dot_path), "-o", str(tmp)], check=True, capture_output=True)
            os.replace(tmp, png)
            written.append(png)
        return written


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise GraphError(f"{path}: unknown graph file suffix {suffix!r}; use .yaml, .yml or .json")


def _gate_name(g: Any, s: int, t: int) -> str:
    try:
        return _gates.get_gate(g if isinstance(g, str) else int(g)).name
    except (KeyError, ValueError, TypeError):
        raise GraphError(f"gate[{s}][{t}]: unknown gate {g!r}; known gates: {', '.join(_gates.gate_names())}") from None


# ---------------------------------------------------------------------- presets
def _vanilla(model: str = "resnet32", **_: Any) -> Graph:
    return Graph([Node(model)], [["cutoff", "through"], ["cutoff", "cutoff"]])


def _dml(nodes: int = 2, model: str = "resnet32", models: Optional[Sequence[str]] = None, **_: Any) -> Graph:
    """Deep mutual learning: every node learns from the label and from every other node."""
    names = list(models) if models else [model] * nodes
    m = len(names)
    g = [["cutoff"] + ["through"] * m] + [["cutoff"] + ["cutoff" if s == t else "through" for t in range(1, m + 1)] for s in range(1, m + 1)]
    return Graph([Node(n) for n in names], g)


def _kd(model: str = "resnet32", teacher: str = "wrn28_2", temperature: float = 2.0, checkpoint: str = PRETRAINED, **_: Any) -> Graph:
    """Knowledge distillation: a frozen pre-trained teacher (node 2) teaches the student (node 1)."""
    g = [["cutoff", "through", "cutoff"], ["cutoff", "cutoff", "cutoff"], ["cutoff", "through", "cutoff"]]
    return Graph([Node(model), Node(teacher, checkpoint)], g, temperature=temperature)


PRESETS = {"vanilla": _vanilla, "dml": _dml, "kd": _kd}


def preset(name: str, **kw: Any) -> Graph:
    """A built-in graph by name: ``vanilla``, ``dml`` (``nodes=N``, ``models=[...]``), ``kd`` (T = 2).

    Keyword arguments: ``model`` (the target's model), ``nodes``, ``models``,
    ``teacher``, ``temperature``, ``checkpoint``.
    """
    if name not in PRESETS:
        raise GraphError(f"unknown graph preset {name!r}; presets: {', '.join(PRESETS)} (or a .yaml/.json path)")
    return PRESETS[name](**kw)


def load_graph(spec: str, **preset_kw: Any) -> Graph:
    """A preset name or a graph file path (what ``--graph`` takes)."""
    if spec in PRESETS:
        return preset(spec, **preset_kw)
    if not Path(spec).is_file():
        raise GraphError(f"{spec!r} is neither a graph preset ({', '.join(PRESETS)}) nor an existing .yaml/.json file")
    return Graph.load(spec)
