"""The knowledge transfer graph: nodes, gate matrix, temperature.

Node 0 is the label; nodes 1..M are networks.  ``gates[s][t]`` is the gate of
edge s -> t (source row, destination column).  A node whose incoming gates
are all cutoff is *frozen*: it is loaded from a checkpoint and never trained.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import operator
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from . import gates as _gates
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
        self.nodes = [_node(n, i) for i, n in enumerate(_sequence(self.nodes, "nodes", _NODES_HELP), start=1)]
        rows = _sequence(self.gates, "gates", _GATES_HELP)
        self.gates = [
            [_gate_name(g, s, t) for t, g in enumerate(_sequence(row, f"gates row {s}", _GATES_HELP))]
            for s, row in enumerate(rows)
        ]
        self.temperature = _temperature(self.temperature)
        self.target = _node_index(self.target, "target")
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
                f"a graph must be a mapping with keys nodes, gates, temperature, target; got {_show(d)}"
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
            raise GraphError(f"nodes must be a list: {_NODES_HELP}; got {_show(d['nodes'])}")
        if not isinstance(d["gates"], list):
            raise GraphError(f"gates must be a list of rows: {_GATES_HELP}; got {_show(d['gates'])}")
        for s, row in enumerate(d["gates"]):
            if not isinstance(row, list):
                raise GraphError(f"gates row {s} must be a list of gates: {_GATES_HELP}; got {_show(row)}")
        for i, n in enumerate(d["nodes"], start=1):
            if not isinstance(n, (str, dict)):
                raise GraphError(
                    f"node {i}: expected a model name or a mapping {{model: ..., checkpoint: ...}}, got {_show(n)}"
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
        atomic_write_text(path, self.dumps(_format_of(path)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, check_models: bool = True) -> "Graph":
        """Read a YAML or JSON graph file; errors name the file and the fault."""
        path = Path(path)
        if not path.is_file():
            raise GraphError(f"graph file {str(path)!r} not found; give a preset name ({', '.join(PRESETS)}) or a path")
        fmt = _format_of(path)
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
            data = _parse(text, fmt)
        except GraphError as e:
            raise GraphError(f"{path}: {e}") from None
        try:
            return cls.from_dict(data, check_models=check_models)
        except GraphError as e:
            raise GraphError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ drawing
    def to_dot(self, *, title: Optional[str] = None, accuracies: Optional[Sequence[float]] = None,
               metric: str = "val") -> str:
        """Graphviz DOT text in the paper's style.

        The target node is red, frozen nodes blue, edges labelled by gate,
        cutoff edges left out.  ``accuracies`` (percent, one per network node)
        are printed in the node labels as e.g. ``val 73.9 %`` (``metric`` names the split).
        """
        out = ["digraph KTG {", "  rankdir=LR;", '  node [shape=ellipse, style=filled, fillcolor="white", fontname="Helvetica"];']
        if title:
            out.append(f'  labelloc="t"; label="{title}";')
        out.append('  n0 [label="Label", shape=box, fillcolor="#dddddd"];')
        for i, node in enumerate(self.nodes, start=1):
            text = f"{i}: {node.model}"
            if accuracies is not None:
                text += f"\\n{metric} {float(accuracies[i - 1]):.1f} %"
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

    def draw(self, path: str | os.PathLike, *, title: Optional[str] = None,
             accuracies: Optional[Sequence[float]] = None, metric: str = "val",
             on_png_skipped: Any = None) -> list[Path]:
        """Write ``<path>.dot`` and, with graphviz's ``dot``, ``<path>.png``; return the files written.

        ``accuracies`` (percent, one per network node) are printed in the node
        labels as e.g. ``val 73.9 %`` (``metric`` names the split).  When
        ``dot`` is missing or fails, the PNG is skipped and the reason goes to
        ``on_png_skipped`` (default: a logged warning); the ``.dot`` file is
        written either way.
        """
        base = Path(path).with_suffix("")
        dot_path = base.with_suffix(".dot")
        text = self.to_dot(title=title, accuracies=accuracies, metric=metric)
        atomic_write_text(dot_path, text)
        written = [dot_path]
        skip = on_png_skipped or (lambda why: logging.getLogger("ktg_fast").warning("%s", why))
        exe = shutil.which("dot")
        if exe is None:
            skip("graph PNGs skipped: graphviz's `dot` is not installed (the .dot files are written); install "
                 "graphviz (e.g. apt-get install graphviz) and run the command again to draw them")
            return written
        png = base.with_suffix(".png")
        tmp = png.with_name(png.name + ".tmp")
        try:
            subprocess.run([exe, "-Tpng", str(dot_path), "-o", str(tmp)], check=True, capture_output=True,
                           text=True, timeout=120)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            tmp.unlink(missing_ok=True)
            detail = (getattr(e, "stderr", None) or "").strip().splitlines()
            why = f"exit code {e.returncode}" if isinstance(e, subprocess.CalledProcessError) else str(e)
            skip(f"graph PNGs skipped: graphviz's `{exe} -Tpng` failed ({why}" + (f": {detail[0]}" if detail else "")
                 + "); the .dot files are written")
            return written
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


_NODES_HELP = "one model name or {model: ..., checkpoint: ...} mapping per network node"
_GATES_HELP = "(M+1) rows of M+1 gate names, gates[source][destination], label first"
_BOOL_HELP = "YAML reads unquoted yes/no/on/off/true/false as booleans"


def _show(value: Any) -> str:
    """A value as the user wrote it, for messages: null for None, repr otherwise (shortened)."""
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sequence(value: Any, what: str, help_text: str) -> list[Any]:
    """``value`` as a list; refuse strings, mappings and scalars naming ``what``."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise GraphError(f"{what} must be a list: {help_text}; got {_show(value)}")
    return list(value)


def _node(n: Any, i: int) -> Node:
    """A :class:`Node` from a Node, a model name or a {model, checkpoint} mapping; types checked, i for messages."""
    if isinstance(n, Node):
        model, checkpoint = n.model, n.checkpoint
    elif isinstance(n, str):
        model, checkpoint = n, None
    elif isinstance(n, dict):
        extra = set(n) - {"model", "checkpoint"}
        if extra:
            raise GraphError(f"node {i}: unknown keys {sorted(map(str, extra))}; allowed: model, checkpoint")
        if "model" not in n:
            raise GraphError(f"node {i}: no 'model' key; write e.g. {{model: resnet32}}")
        model, checkpoint = n["model"], n.get("checkpoint")
    else:
        raise GraphError(
            f"node {i}: expected a model name or a mapping {{model: ..., checkpoint: ...}}, got {_show(n)}"
        )
    if not isinstance(model, str) or not model.strip():
        raise GraphError(f"node {i}: model must be a model name such as 'resnet32', got {_show(model)}")
    if isinstance(checkpoint, bool):
        raise GraphError(
            f"node {i}: checkpoint is a boolean ({_BOOL_HELP}); write a path, '{PRETRAINED}', or leave it out"
        )
    if checkpoint is not None and (not isinstance(checkpoint, (str, os.PathLike)) or not str(checkpoint).strip()):
        raise GraphError(
            f"node {i}: checkpoint must be a file path or '{PRETRAINED}' (or left out), got {_show(checkpoint)}"
        )
    return Node(model, None if checkpoint is None else str(checkpoint))


def _temperature(value: Any) -> float:
    """A finite positive temperature as a float; strings, booleans and lists are refused."""
    if isinstance(value, bool):
        raise GraphError(f"temperature is a boolean ({_BOOL_HELP}); write a number such as 1.0 or 4")
    if not isinstance(value, numbers.Real):
        raise GraphError(f"temperature must be a finite positive number such as 1.0 or 4, got {_show(value)}")
    t = float(value)
    if not (math.isfinite(t) and t > 0):
        raise GraphError(f"temperature must be a finite positive number such as 1.0 or 4, got {t}")
    return t


def _node_index(value: Any, what: str) -> int:
    """An integer node index; floats (1.7, and 1.0 too), strings and booleans are refused, never truncated."""
    if isinstance(value, bool):
        raise GraphError(f"{what} is a boolean ({_BOOL_HELP}); write a node number such as 1")
    try:
        return operator.index(value)  # ints, numpy ints and 0-dim integer tensors
    except TypeError:
        raise GraphError(f"{what} must be an integer node number such as 1, got {_show(value)}") from None


def _gate_name(g: Any, s: int, t: int) -> str:
    """The canonical name of gate ``g`` (a name or an integer code) of edge s -> t."""
    known = ", ".join(_gates.gate_names())
    if isinstance(g, bool):
        raise GraphError(f"gate[{s}][{t}] is the boolean {g} ({_BOOL_HELP}); write a gate name: {known}")
    if not isinstance(g, str):
        try:
            g = operator.index(g)  # an integer code; floats are refused, never truncated (1.7 is not through)
        except TypeError:
            codes = ", ".join(f"{i} {n}" for i, n in enumerate(_gates.gate_names()))
            raise GraphError(
                f"gate[{s}][{t}]: {_show(g)} is not a gate: write a gate name ({known}) "
                f"or an integer code ({codes})"
            ) from None
    try:
        return _gates.get_gate(g).name
    except (KeyError, ValueError, TypeError):
        raise GraphError(f"gate[{s}][{t}]: unknown gate {_show(g)}; known gates: {known}") from None


# ------------------------------------------------------------------- parsing
def _parse(text: str, fmt: str) -> Any:
    """Parse graph file text; duplicate keys and syntax errors raise a one-line :class:`GraphError`."""
    if fmt == "json":
        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for k, v in items:
                if k in seen:
                    raise GraphError(f"duplicate key {k!r}: JSON keeps only the last one; remove one")
                seen[k] = v
            return seen

        try:
            return json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as e:
            raise GraphError(f"cannot parse JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        where = e.problem_mark or e.context_mark
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        context = f" ({e.context})" if e.context and e.problem else ""
        raise GraphError(f"cannot parse YAML: {e.problem or e.context}{context}{at}") from None
    except yaml.reader.ReaderError as e:
        raise GraphError(
            f"not a YAML text file: unacceptable character #x{e.character:04x} ({e.reason}) at offset {e.position}"
        ) from None
    except yaml.YAMLError as e:
        raise GraphError(f"cannot parse YAML: {' '.join(str(e).split())}") from None


_LOADER: Any = None


def _yaml_loader() -> Any:
    """A SafeLoader that refuses duplicate keys and reads ``1e-3`` as a number (as YAML 1.2 does)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    class GraphLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # keys merged with << may be overridden: that is not a duplicate
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:
                        continue  # unhashable: the base class reports it
                    if first is not None:
                        raise GraphError(
                            f"duplicate key {_show(key)} at line {key_node.start_mark.line + 1} (first at line "
                            f"{first.line + 1}): YAML readers silently keep only the last one; remove one"
                        )
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    # YAML 1.1 needs a dot in a float (1e-3 would be a string); accept 1e-3, 2E5, 1.5e3 as numbers.
    GraphLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )
    _LOADER = GraphLoader
    return _LOADER


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
