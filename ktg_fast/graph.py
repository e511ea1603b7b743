"""The knowledge transfer graph: nodes, gate matrix, temperature.

Node 0 is the label; nodes 1..M are networks.  ``gates[s][t]`` is the gate of
edge s -> t (source row, destination column).  A node whose incoming gates
are all cutoff is *frozen*: it is loaded from a checkpoint and never trained.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from . import gates as _gates
from . import graph_draw
from .graph_io import (GATES_HELP, NODES_HELP, PRETRAINED, GraphError, Node, as_list, format_of, parse_gate_name,
                       parse_node, parse_node_index, parse_temperature, parse_text, show_value)
from .io import atomic_write_text
from .models import canonical_model_name

__all__ = ["Graph", "GraphError", "Node", "preset", "PRESETS", "PRETRAINED", "check_gate_structure", "frozen_nodes"]

def check_gate_structure(codes: torch.Tensor) -> None:
    """The one home of the structural rule: nothing flows into the label, no node feeds itself.

    Args:
        codes: (M+1, M+1) integer gate codes [source][destination] (any device).

    Raises:
        ValueError naming the first edge in column 0 or on the diagonal that is not cutoff.
    """
    codes = codes.detach().cpu()
    m1 = codes.shape[0]
    for s in range(m1):
        if int(codes[s, 0]) != _gates.CUTOFF:
            raise ValueError(f"gate[{s}][0] is {_gates.get_gate(int(codes[s, 0])).name!r}: nothing flows into the "
                             "label node 0 (column 0 must be cutoff); use 'cutoff'")
    for t in range(1, m1):
        if int(codes[t, t]) != _gates.CUTOFF:
            raise ValueError(f"gate[{t}][{t}] is {_gates.get_gate(int(codes[t, t])).name!r}: a node has no edge to "
                             "itself (the diagonal must be cutoff); use 'cutoff'")


def frozen_nodes(codes: torch.Tensor) -> list[int]:
    """The one home of "frozen": 1-based network nodes whose every input (label edge included) is cutoff."""
    codes = codes.detach().cpu()
    off_diag = ~torch.eye(codes.shape[0], dtype=torch.bool)
    live = (codes != _gates.CUTOFF) & off_diag
    return [t for t in range(1, codes.shape[0]) if not bool(live[:, t].any())]


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
    # The folder relative checkpoint paths are read from: the graph file's (Graph.load), else the cwd.
    base_dir: Optional[Path] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.nodes = [parse_node(n, i) for i, n in enumerate(as_list(self.nodes, "nodes", NODES_HELP), start=1)]
        rows = as_list(self.gates, "gates", GATES_HELP)
        self.gates = [
            [parse_gate_name(g, s, t) for t, g in enumerate(as_list(row, f"gates row {s}", GATES_HELP))]
            for s, row in enumerate(rows)
        ]
        self.temperature = parse_temperature(self.temperature)
        self.target = parse_node_index(self.target, "target")
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
        """Whether network node t (1-based) has only cutoff inputs (:func:`frozen_nodes`)."""
        return t in self.frozen

    @property
    def frozen(self) -> list[int]:
        """1-based indices of frozen nodes."""
        return frozen_nodes(self.gate_codes())

    @property
    def label_free(self) -> bool:
        """True when nothing in the graph ever sees a label: no edge leaves node 0 and no node is a frozen
        (pre-trained) teacher, so every node can only learn from untrained peers (chance accuracy)."""
        codes = self.gate_codes()
        return not bool((codes[0, 1:] != _gates.CUTOFF).any()) and not self.frozen

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
        want = f"gate matrix must be {m + 1}x{m + 1} for {m} network nodes plus the label (row s, column t: edge s -> t; row 0: the label)"
        if len(self.gates) != m + 1:
            raise GraphError(f"{want}; got {len(self.gates)} rows")
        bad = [(s, len(r)) for s, r in enumerate(self.gates) if len(r) != m + 1]
        if bad:
            rows = ", ".join(f"row {s} has {n} entr{'y' if n == 1 else 'ies'}" for s, n in bad[:4])
            raise GraphError(f"{want}; {rows}" + (f" and {len(bad) - 4} more rows are off" if len(bad) > 4 else ""))
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise GraphError(f"temperature must be a finite positive number such as 1.0 or 4, got {self.temperature}")
        try:
            check_gate_structure(self.gate_codes())
        except ValueError as e:
            raise GraphError(str(e)) from None
        if not 1 <= self.target <= m:
            raise GraphError(f"target node {self.target} does not exist: pick 1..{m}")
        if self.check_models:
            for i, node in enumerate(self.nodes, start=1):
                try:  # the registry's message says why: unknown (listing the names once), bad depth, too big
                    canonical_model_name(node.model)
                except (KeyError, ValueError, TypeError) as e:
                    raise GraphError(f"node {i}: {e}") from None
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
            raise GraphError(
                f"a graph must be a mapping with keys nodes, gates, temperature, target; got {show_value(d)}"
            )
        unknown = set(d) - {"temperature", "target", "nodes", "gates"}
        if unknown:
            raise GraphError(
                f"unknown graph keys {sorted(map(str, unknown))}; allowed: nodes, gates, temperature, target"
            )
        for key in ("nodes", "gates"):
            if key not in d:
                raise GraphError(f"graph has no {key!r} entry")
        # Types are checked strictly (a list is not a tuple or a string, a row is a list):
        # the file's own structure, not Python's duck typing, decides.
        if not isinstance(d["nodes"], list):
            raise GraphError(f"nodes must be a list: {NODES_HELP}; got {show_value(d['nodes'])}")
        if not isinstance(d["gates"], list):
            raise GraphError(f"gates must be a list of rows: {GATES_HELP}; got {show_value(d['gates'])}")
        for s, row in enumerate(d["gates"]):
            if not isinstance(row, list):
                raise GraphError(f"gates row {s} must be a list of gates: {GATES_HELP}; got {show_value(row)}")
        for i, n in enumerate(d["nodes"], start=1):
            if not isinstance(n, (str, dict)):
                raise GraphError(
                    f"node {i}: expected a model name or a mapping {{model: ..., checkpoint: ...}}, got {show_value(n)}"
                )
        return cls(
            nodes=d["nodes"],
            gates=d["gates"],
            temperature=d.get("temperature", 1.0),
            target=d.get("target", 1),
            check_models=check_models,
        )

    def dumps(self, fmt: str = "yaml") -> str:
        """Serialise to YAML or JSON text."""
        d = self.to_dict()
        if fmt == "json":
            return json.dumps(d, indent=2) + "\n"
        if fmt == "yaml":
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
        atomic_write_text(path, self.dumps(format_of(path)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, check_models: bool = True) -> "Graph":
        """Read a YAML or JSON graph file; errors name the file and the fault.

        A node's relative ``checkpoint`` path is read from the file's folder (``base_dir``); the graph
        itself keeps the path as written, so saving it again gives the same text.
        """
        path = Path(path)
        if not path.is_file():
            raise GraphError(f"graph file {str(path)!r} not found; give a preset name ({', '.join(PRESETS)}) or a path")
        fmt = format_of(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise GraphError(f"{path}: cannot read the graph file: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GraphError(
                f"{path}: not a UTF-8 text file (byte {raw[e.start]:#04x} at offset {e.start}); "
                "a graph file is YAML or JSON text"
            ) from None
        try:
            data = parse_text(text, fmt)
        except GraphError as e:
            raise GraphError(f"{path}: {e}") from None
        try:
            graph = cls.from_dict(data, check_models=check_models)
        except GraphError as e:
            raise GraphError(f"{path}: {e}") from None
        graph.base_dir = path.parent.absolute()  # relative checkpoint paths are read from here, not the cwd
        return graph

    # ------------------------------------------------------------------ drawing
    def to_dot(self, *, title: Optional[str] = None, accuracies: Optional[Sequence[float]] = None,
               metric: str = "val") -> str:
        """Graphviz DOT text in the paper's style (:func:`ktg_fast.graph_draw.to_dot`)."""
        return graph_draw.to_dot(self, title=title, accuracies=accuracies, metric=metric)

    def draw(self, path: str | os.PathLike, *, title: Optional[str] = None,
             accuracies: Optional[Sequence[float]] = None, metric: str = "val",
             on_png_skipped: Any = None) -> list[Path]:
        """Write ``<path>.dot`` and, with graphviz, ``<path>.png`` (:func:`ktg_fast.graph_draw.draw`)."""
        return graph_draw.draw(self, path, title=title, accuracies=accuracies, metric=metric,
                               on_png_skipped=on_png_skipped)


def _vanilla(model: str = "resnet32") -> Graph:
    return Graph([Node(model)], [["cutoff", "through"], ["cutoff", "cutoff"]])


def _dml(nodes: Optional[int] = None, model: Optional[str] = None, models: Optional[Sequence[str]] = None) -> Graph:
    """Deep mutual learning: every node learns from the label and from every other node.

    ``models`` names each node's model; without it, ``nodes`` (default 2) nodes of ``model`` (default resnet32).
    """
    if models is not None:
        if isinstance(models, str):
            raise GraphError(f"preset 'dml': models= takes a list of model names, got the string {models!r}; "
                             f"write models=[{models!r}, ...], or model={models!r} for every node")
        if model is not None:
            raise GraphError("preset 'dml': give models=[...] (one model per node) or model= (the same model for "
                             "every node), not both")
        if nodes is not None and nodes != len(models):
            raise GraphError(f"preset 'dml': nodes={nodes} but models= names {len(models)} models; "
                             "drop nodes= (models= sets the node count) or make them agree")
    names = list(models) if models else [model or "resnet32"] * (2 if nodes is None else nodes)
    m = len(names)
    g = [["cutoff"] + ["through"] * m] + [["cutoff"] + ["cutoff" if s == t else "through" for t in range(1, m + 1)] for s in range(1, m + 1)]
    return Graph([Node(n) for n in names], g)


def _kd(model: str = "resnet32", teacher: str = "wrn28_2", temperature: float = 2.0,
        checkpoint: str = PRETRAINED) -> Graph:
    """Knowledge distillation: a frozen pre-trained teacher (node 2) teaches the student (node 1)."""
    g = [["cutoff", "through", "cutoff"], ["cutoff", "cutoff", "cutoff"], ["cutoff", "through", "cutoff"]]
    return Graph([Node(model), Node(teacher, checkpoint)], g, temperature=temperature)


PRESETS = {"vanilla": _vanilla, "dml": _dml, "kd": _kd}


def preset(name: str, **kw: Any) -> Graph:
    """A built-in graph by name: ``vanilla``, ``dml`` (``nodes=N``, ``models=[...]``), ``kd`` (T = 2).

    Keyword arguments: ``vanilla``: ``model``; ``dml``: ``nodes``, ``model`` (every node's) or ``models``
    (one per node); ``kd``: ``model`` (the student), ``teacher``, ``temperature``, ``checkpoint``.
    A keyword the preset does not take raises :class:`GraphError` naming it and the accepted ones.
    """
    if name not in PRESETS:
        raise GraphError(f"unknown graph preset {name!r}; presets: {', '.join(PRESETS)} (or a .yaml/.json path)")
    accepted = list(inspect.signature(PRESETS[name]).parameters)
    unknown = [k for k in kw if k not in accepted]
    if unknown:
        s = "s" if len(unknown) > 1 else ""
        raise GraphError(f"graph preset {name!r} got unknown keyword{s} {', '.join(map(repr, unknown))}; "
                         f"it accepts {', '.join(accepted)}")
    return PRESETS[name](**kw)


def load_graph(spec: str, **preset_kw: Any) -> Graph:
    """A preset name or a graph file path (what ``--graph`` takes)."""
    if spec in PRESETS:
        return preset(spec, **preset_kw)
    if not Path(spec).is_file():
        raise GraphError(f"{spec!r} is neither a graph preset ({', '.join(PRESETS)}) nor an existing .yaml/.json file")
    return Graph.load(spec)
