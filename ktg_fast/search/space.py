"""The search space of Section 3.5: auxiliary models and the gate of every edge.

Node 1 is the target (its model fixed); nodes 2..N take a model from a list;
every edge s -> t (s in 0..N, t in 1..N, s != t), label edges included, takes a
gate from a list: ``len(models) ** (N - 1) * len(gates) ** (N * N)`` graphs.

Parameters are named ``model_<i>`` and ``gate_<s>_<t>`` so Optuna's samplers
see plain categorical choices.  Two graphs that differ only by the numbering
of their auxiliary nodes train the same way; :meth:`SearchSpace.key` maps both
to the same canonical key so a search never trains the pair twice.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from ..gates import gate_codes, gate_names, get_gate
from ..graph import PRETRAINED, Graph, Node, frozen_nodes
from ..models import available_models, canonical_model_name

__all__ = ["SearchSpace", "SearchError", "MAX_SEARCH_NODES", "DEFAULT_MODELS", "DEFAULT_GATES", "FrozenTargetError"]

# The paper's auxiliary models and its four gates.
DEFAULT_MODELS = ("resnet32", "resnet110", "wrn28_2")
DEFAULT_GATES = ("through", "cutoff", "linear", "correct")


# At most this many network nodes per searched graph: the fused kernel's one-launch limit (ktg_fast.kernels.MAX_NODES).
MAX_SEARCH_NODES = 16
# SearchSpace.key tries at most this many renumberings of the auxiliary nodes (8!: every renumbering of 9 nodes).
_KEY_ORDERINGS = math.factorial(8)


class SearchError(ValueError):
    """Bad search settings or an unusable storage/study; the message names the fault and the fix."""


class FrozenTargetError(ValueError):
    """The sampled gates leave the target node without any input (it would be frozen)."""


@dataclass(frozen=True)
class SearchSpace:
    """Graphs with ``nodes`` network nodes whose node 1 is a ``target``.

    Attributes:
        nodes: N, network nodes (the label not counted); at least 2.
        target: model of node 1.
        models: choices for the models of nodes 2..N.
        gates: choices for every edge's gate.
        temperature: T of the KL edges (1 in the paper's search).
    """

    nodes: int
    target: str
    models: tuple[str, ...] = DEFAULT_MODELS
    gates: tuple[str, ...] = DEFAULT_GATES
    temperature: float = 1.0
    _names: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or self.nodes < 2:
            raise SearchError(f"--nodes must be at least 2 (the target and one auxiliary node); got {self.nodes}")
        if self.nodes > MAX_SEARCH_NODES:
            raise SearchError(f"--nodes {self.nodes} is more than a search takes ({MAX_SEARCH_NODES}, the fused loss "
                              f"kernel's node limit): search at most {MAX_SEARCH_NODES} nodes")

        def model(name: str, flag: str) -> str:
            try:
                return canonical_model_name(name)
            except KeyError:  # available_models() ends with the name patterns
                raise SearchError(f"unknown model {name!r} in {flag}; known: {', '.join(available_models())}") from None
            except (ValueError, TypeError) as e:  # a pattern with a bad or too large depth or width
                raise SearchError(f"unknown model {name!r} in {flag}: {e}") from None

        object.__setattr__(self, "target", model(self.target, "--target"))
        if not self.models:
            raise SearchError("--models needs at least one model for the auxiliary nodes")
        models = tuple(dict.fromkeys(model(m, "--models") for m in self.models))
        object.__setattr__(self, "models", models)
        if not self.gates:
            raise SearchError("--gates needs at least one gate")
        names = []
        for g in self.gates:
            try:
                names.append(get_gate(g).name)
            except KeyError:
                raise SearchError(f"unknown gate {g!r} in --gates; known gates: {', '.join(gate_names())}") from None
        object.__setattr__(self, "gates", tuple(dict.fromkeys(names)))
        if not self.temperature > 0:
            raise SearchError(f"--temperature must be positive; got {self.temperature}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "_names", tuple(self.param_names()))

    # ---------------------------------------------------------------- params
    def edges(self) -> list[tuple[int, int]]:
        """Searched edges (s, t): every source 0..N into every network node 1..N, s != t."""
        n = self.nodes
        return [(s, t) for s in range(n + 1) for t in range(1, n + 1) if s != t]

    def param_names(self) -> list[str]:
        """Optuna parameter names, models first."""
        return [f"model_{i}" for i in range(2, self.nodes + 1)] + [f"gate_{s}_{t}" for s, t in self.edges()]

    def suggest(self, trial: Any) -> dict[str, str]:
        """Draw (or, for an enqueued/retried trial, read back) every parameter of ``trial``."""
        params = {f"model_{i}": trial.suggest_categorical(f"model_{i}", list(self.models))
                  for i in range(2, self.nodes + 1)}
        for s, t in self.edges():
            params[f"gate_{s}_{t}"] = trial.suggest_categorical(f"gate_{s}_{t}", list(self.gates))
        return params

    def size(self) -> int:
        """Number of parameter combinations (the paper's M^(N-1) * G^(N^2))."""
        return len(self.models) ** (self.nodes - 1) * len(self.gates) ** (self.nodes * self.nodes)

    # ----------------------------------------------------------------- graphs
    def _unpack(self, params: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
        missing = [k for k in self._names if k not in params]
        if missing:
            raise KeyError(f"parameters missing for this search space: {missing[:4]}")
        n = self.nodes
        models = [self.target] + [str(params[f"model_{i}"]) for i in range(2, n + 1)]
        gates = [["cutoff"] * (n + 1) for _ in range(n + 1)]
        for s, t in self.edges():
            gates[s][t] = str(params[f"gate_{s}_{t}"])
        return models, gates

    def graph(self, params: Mapping[str, Any]) -> Graph:
        """The graph of a parameter set; frozen auxiliary nodes load ``pretrained`` teachers.

        Raises:
            FrozenTargetError: every input of the target is cutoff.
        """
        models, gates = self._unpack(params)
        n = self.nodes
        frozen_set = set(frozen_nodes(gate_codes(gates)))  # graph.py: the one home of "frozen"
        frozen = [t in frozen_set for t in range(1, n + 1)]
        if frozen[0]:
            raise FrozenTargetError("every input of the target (node 1) is cutoff")
        nodes = [Node(m, PRETRAINED if f else None) for m, f in zip(models, frozen)]
        return Graph(nodes, gates, temperature=self.temperature, target=1)

    def key(self, params: Mapping[str, Any]) -> str:
        """Canonical text of a graph, the same for every renumbering of its auxiliary nodes.

        The smallest text over the renumberings: all of them up to 9 nodes (8! orderings).  Beyond, over the
        orderings that keep the nodes sorted by an invariant class (colour refinement: model, gates with the
        label and the target, then the classes of the nodes each one teaches and learns from), which is the
        same for any renumbering, so the key stays canonical; only if those orderings still number more than
        8! (many interchangeable nodes) are ties broken by node number, and a renumbered twin may then get a
        key of its own (trained twice, never wrongly merged).
        """
        models, gates = self._unpack(params)
        n = self.nodes
        aux = list(range(2, n + 1))
        if math.factorial(n - 1) <= _KEY_ORDERINGS:
            orderings: Any = itertools.permutations(aux)
        else:
            cells = _refined_cells(models, gates, aux)
            if math.prod(math.factorial(len(c)) for c in cells) <= _KEY_ORDERINGS:
                orderings = (tuple(v for part in combo for v in part)
                             for combo in itertools.product(*(itertools.permutations(c) for c in cells)))
            else:
                orderings = [tuple(v for c in cells for v in c)]
        best = None
        for perm in orderings:
            order = [0, 1, *perm]  # new index i takes old node order[i]
            text = ",".join(models[order[i] - 1] for i in range(1, n + 1)) + "|" + "/".join(
                ",".join(gates[order[s]][order[t]] for t in range(1, n + 1)) for s in range(n + 1))
            if best is None or text < best:
                best = text
        assert best is not None
        return best

    def count_distinct(self, limit: int = 200_000) -> int | None:
        """Distinct trainable graphs (target not frozen, auxiliary renumberings merged).

        Enumerates when :meth:`size` is at most ``limit``; returns None above it.
        """
        if self.size() > limit:
            return None
        names = self._names
        choices = [self.models if k.startswith("model_") else self.gates for k in names]
        keys = set()
        for combo in itertools.product(*choices):
            params = dict(zip(names, combo))
            # graph.frozen_nodes' rule for the target, on the parameter names (this loop runs 10^5 times).
            if all(params[f"gate_{s}_1"] == "cutoff" for s in range(self.nodes + 1) if s != 1):
                continue
            keys.add(self.key(params))
        return len(keys)

    # ------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_names", None)
        d["models"], d["gates"] = list(self.models), list(self.gates)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchSpace":
        return cls(nodes=int(d["nodes"]), target=str(d["target"]), models=tuple(d["models"]),
                   gates=tuple(d["gates"]), temperature=float(d.get("temperature", 1.0)))

    def describe(self) -> str:
        """One line: sizes and choices."""
        exp = self.nodes * self.nodes
        return (f"{self.nodes} nodes (target {self.target}), auxiliary models {{{', '.join(self.models)}}}, "
                f"gates {{{', '.join(self.gates)}}}: {len(self.models)}^{self.nodes - 1} x {len(self.gates)}^{exp} "
                f"= {_count(self.size())} graphs")


def _count(k: int) -> str:
    """A count for people: digits with separators up to a million, then ``~10^x`` (10^164 has 165 digits)."""
    return f"{k:,}" if k <= 10**6 else f"~10^{math.log10(k):.1f}"


def _refined_cells(models: list[str], gates: list[list[str]], aux: list[int]) -> list[list[int]]:
    """The auxiliary nodes in cells of one class, cells in class order (colour refinement).

    A node's first class is its model and its gates from the label, to and from the target; each round
    splits a class by the classes of the nodes a node exchanges each gate with, until no class splits.
    The classes and their order depend on the graph only, not on how its auxiliary nodes are numbered.
    """
    def ranks(sig: dict[int, Any]) -> dict[int, int]:
        order = {s: i for i, s in enumerate(sorted(set(sig.values())))}
        return {v: order[sig[v]] for v in aux}

    cls = ranks({v: (models[v - 1], gates[0][v], gates[v][1], gates[1][v]) for v in aux})
    while True:
        new = ranks({v: (cls[v], tuple(sorted((gates[u][v], gates[v][u], cls[u]) for u in aux if u != v)))
                     for v in aux})
        if len(set(new.values())) == len(set(cls.values())):
            break
        cls = new
    cells: dict[int, list[int]] = {}
    for v in aux:
        cells.setdefault(cls[v], []).append(v)
    return [cells[c] for c in sorted(cells)]


def gate_letters(gates: Sequence[str]) -> dict[str, str]:
    """Short letters for a compact gate matrix: cutoff '-', through 'T', linear 'L', correct 'C'."""
    fixed = {"cutoff": "-", "through": "T", "linear": "L", "correct": "C"}
    out = {}
    used = set(fixed.values())
    for g in gates:
        if g in fixed:
            out[g] = fixed[g]
            continue
        letter = next((c.upper() for c in g if c.upper() not in used and c.isalpha()), g[:2])
        used.add(letter)
        out[g] = letter
    return out
