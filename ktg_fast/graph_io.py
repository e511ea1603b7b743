"""Reading graph files: every field's type checked, errors that name the file, the field and the value.

Strict on purpose: node indices are integers (``1.7`` and ``true`` are refused), a gate is a
name or an integer code (YAML 1.1 reads unquoted ``yes``/``no`` as booleans: refused with that
explanation), duplicated keys are refused (PyYAML would keep the last one silently), and
``1e-3`` is a number (PyYAML would read a string).
"""
from __future__ import annotations

import json
import math
import numbers
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from . import gates as _gates

__all__ = ["PRETRAINED", "GraphError", "Node", "format_of", "parse_text", "parse_node", "parse_temperature",
           "parse_node_index", "parse_gate_name", "as_list", "show_value", "NODES_HELP", "GATES_HELP"]

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


def format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise GraphError(f"{path}: unknown graph file suffix {suffix!r}; use .yaml, .yml or .json")


NODES_HELP = "one model name or {model: ..., checkpoint: ...} mapping per network node"
GATES_HELP = "(M+1) rows of M+1 gate names, gates[source][destination], label first"
BOOL_HELP = "YAML reads unquoted yes/no/on/off/true/false as booleans"


def show_value(value: Any) -> str:
    """A value as the user wrote it, for messages: null for None, repr otherwise (shortened)."""
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_list(value: Any, what: str, help_text: str) -> list[Any]:
    """``value`` as a list; refuse strings, mappings and scalars naming ``what``."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise GraphError(f"{what} must be a list: {help_text}; got {show_value(value)}")
    return list(value)


def parse_node(n: Any, i: int) -> Node:
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
            f"node {i}: expected a model name or a mapping {{model: ..., checkpoint: ...}}, got {show_value(n)}"
        )
    if not isinstance(model, str) or not model.strip():
        raise GraphError(f"node {i}: model must be a model name such as 'resnet32', got {show_value(model)}")
    if isinstance(checkpoint, bool):
        raise GraphError(
            f"node {i}: checkpoint is a boolean ({BOOL_HELP}); write a path, '{PRETRAINED}', or leave it out"
        )
    if checkpoint is not None and (not isinstance(checkpoint, (str, os.PathLike)) or not str(checkpoint).strip()):
        raise GraphError(
            f"node {i}: checkpoint must be a file path or '{PRETRAINED}' (or left out), got {show_value(checkpoint)}"
        )
    return Node(model, None if checkpoint is None else str(checkpoint))


def parse_temperature(value: Any) -> float:
    """A finite positive temperature as a float; strings, booleans and lists are refused."""
    if isinstance(value, bool):
        raise GraphError(f"temperature is a boolean ({BOOL_HELP}); write a number such as 1.0 or 4")
    if not isinstance(value, numbers.Real):
        raise GraphError(f"temperature must be a finite positive number such as 1.0 or 4, got {show_value(value)}")
    t = float(value)
    if not (math.isfinite(t) and t > 0):
        raise GraphError(f"temperature must be a finite positive number such as 1.0 or 4, got {t}")
    return t


def parse_node_index(value: Any, what: str) -> int:
    """An integer node index; floats (1.7, and 1.0 too), strings and booleans are refused, never truncated."""
    if isinstance(value, bool):
        raise GraphError(f"{what} is a boolean ({BOOL_HELP}); write a node number such as 1")
    try:
        return operator.index(value)  # ints, numpy ints and 0-dim integer tensors
    except TypeError:
        raise GraphError(f"{what} must be an integer node number such as 1, got {show_value(value)}") from None


def parse_gate_name(g: Any, s: int, t: int) -> str:
    """The canonical name of gate ``g`` (a name or an integer code) of edge s -> t."""
    known = ", ".join(_gates.gate_names())
    if isinstance(g, bool):
        raise GraphError(f"gate[{s}][{t}] is the boolean {g} ({BOOL_HELP}); write a gate name: {known}")
    if not isinstance(g, str):
        try:
            g = operator.index(g)  # an integer code; floats are refused, never truncated (1.7 is not through)
        except TypeError:
            raise GraphError(
                f"gate[{s}][{t}]: {show_value(g)} is not a gate: write a gate name or its integer code "
                f"({_gates.gates_with_codes()})"
            ) from None
    try:
        return _gates.get_gate(g).name
    except (KeyError, ValueError, TypeError):
        raise GraphError(f"gate[{s}][{t}]: unknown gate {show_value(g)}; known gates (name and integer code): "
                         f"{_gates.gates_with_codes()}") from None


# ------------------------------------------------------------------- parsing
def parse_text(text: str, fmt: str) -> Any:
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
        return yaml.load(text, Loader=yaml_loader())  # noqa: S506 -- a SafeLoader subclass
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


def yaml_loader() -> Any:
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
                            f"duplicate key {show_value(key)} at line {key_node.start_mark.line + 1} (first at line "
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
