"""Gate registry: the per-sample weight each edge's loss is multiplied by.

A gate has a name (used in graph files), an integer code (used in gate
matrices and by the fused kernel) and a reference weight function.  The four
gates of the paper are built in; users register their own with
:func:`register_gate`.  Custom gates run on the PyTorch reference path only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "Gate",
    "UnknownGateError",
    "gates_with_codes",
    "GateContext",
    "CUTOFF",
    "THROUGH",
    "LINEAR",
    "CORRECT",
    "KERNEL_GATES",
    "register_gate",
    "get_gate",
    "gate_names",
    "gate_codes",
]


@dataclass(frozen=True)
class GateContext:
    """What a gate's weight function may look at, for every source at once.

    Attributes:
        source_logits: (M, B, C) detached logits of the network nodes 1..M.
        labels: (B,) int64 labels (ignored rows hold ``ignore_index``).
        progress: 0-dim float tensor, k / k_end of the current step.  A custom gate always sees
            one value: when the loss is given one progress per destination node (an (M,) tensor),
            the weight function is called once per destination t with ``progress[t-1]`` and
            ``destination = t``, and its weights apply to the edges into t only.
        correct: (M+1, B) bool, whether each source's argmax equals the label
            (row 0, the label itself, is always True); None unless a gate
            other than cutoff, through and linear is in use.
        destination: None when the weights apply to every destination (one progress for all);
            the 1-based destination node t of a per-destination call (see ``progress``).
    """

    source_logits: torch.Tensor
    labels: torch.Tensor
    progress: torch.Tensor
    correct: Optional[torch.Tensor]
    destination: Optional[int] = None


# A weight function returns per-sample weights for every source s in 0..M:
# a tensor broadcastable to (M+1, B).
WeightFn = Callable[[GateContext], Union[torch.Tensor, float]]


@dataclass(frozen=True)
class Gate:
    """A gate: its name, integer code and weight function."""

    name: str
    code: int
    weight: WeightFn
    builtin: bool = False


_BY_NAME: dict[str, Gate] = {}
_BY_CODE: dict[int, Gate] = {}

# Codes of the built-in gates; the Triton kernel knows exactly these.
CUTOFF, THROUGH, LINEAR, CORRECT = 0, 1, 2, 3
KERNEL_GATES = frozenset({CUTOFF, THROUGH, LINEAR, CORRECT})


def _add(gate: Gate) -> Gate:
    _BY_NAME[gate.name] = gate
    _BY_CODE[gate.code] = gate
    return gate


_add(Gate("cutoff", CUTOFF, lambda ctx: 0.0, builtin=True))
_add(Gate("through", THROUGH, lambda ctx: 1.0, builtin=True))
_add(Gate("linear", LINEAR, lambda ctx: ctx.progress, builtin=True))
_add(Gate("correct", CORRECT, lambda ctx: ctx.correct.to(ctx.source_logits.dtype), builtin=True))


def register_gate(name: str, weight: WeightFn, *, code: int | None = None) -> Gate:
    """Register a custom gate usable by name in graphs and ``graph_loss``.

    Args:
        name: the name graph files use (lower case, no spaces).
        weight: ``weight(ctx: GateContext)`` returning per-sample weights
            broadcastable to (M+1, B): row s weighs every edge leaving source s
            (every edge into ``ctx.destination`` only, in a per-destination call).
        code: integer code; by default the next free one from 16 up.

    Returns:
        The registered :class:`Gate`.
    """
    if not name or not name.isidentifier() or name != name.lower():
        raise ValueError(f"gate name {name!r} must be a lower-case identifier")
    if name in _BY_NAME:
        raise ValueError(f"a gate named {name!r} is already registered")
    if code is None:
        code = max(16, max(_BY_CODE) + 1)
    if code in _BY_CODE:
        raise ValueError(f"gate code {code} is already used by {_BY_CODE[code].name!r}")
    return _add(Gate(name, int(code), weight))


def unregister_gate(name: str) -> None:
    """Remove a custom gate (built-in gates cannot be removed)."""
    gate = get_gate(name)
    if gate.builtin:
        raise ValueError(f"built-in gate {name!r} cannot be removed")
    del _BY_NAME[gate.name]
    del _BY_CODE[gate.code]


def gate_names() -> list[str]:
    """Names of all registered gates, built-in ones first in code order."""
    return [g.name for g in sorted(_BY_NAME.values(), key=lambda g: g.code)]


def gates_with_codes() -> str:
    """``cutoff (0), through (1), linear (2), correct (3)``: every registered gate's name and integer code,
    for messages about a gate that is not one."""
    return ", ".join(f"{g.name} ({g.code})" for g in sorted(_BY_NAME.values(), key=lambda g: g.code))


class UnknownGateError(KeyError, ValueError):
    """A gate name or code that is not registered: a ``KeyError`` (a registry lookup) and a ``ValueError``
    (bad input, as every other input check raises), printed without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_gate(key: str | int) -> Gate:
    """Look a gate up by name or integer code; unknown keys raise :class:`UnknownGateError` (a ``KeyError``
    and a ``ValueError``) naming the choices."""
    if isinstance(key, str):
        gate = _BY_NAME.get(key.strip().lower())
    else:
        gate = _BY_CODE.get(int(key))
    if gate is None:
        raise UnknownGateError(f"unknown gate {key!r}; known gates (name and integer code): {gates_with_codes()}")
    return gate


def _code_of(g: object, s: int, t: int) -> int:
    """The code of one gate-matrix entry: a gate name or an integer code (never a float or a bool)."""
    if isinstance(g, bool) or not isinstance(g, (str, int)):
        # 1.7 must not silently become through (1), nor True/yes become a code.
        raise ValueError(f"gate[{s}][{t}] is {g!r}: a gate is a name or its integer code ({gates_with_codes()})")
    try:
        return get_gate(g).code
    except UnknownGateError as e:
        raise UnknownGateError(f"gate[{s}][{t}]: {e}") from None


def gate_codes(gates: Union[torch.Tensor, Sequence[Sequence[Union[str, int]]]]) -> torch.Tensor:
    """Turn a square gate matrix of names or integer codes into an int64 CPU tensor of codes.

    Raises ``ValueError`` for a non-square matrix or a float / bool entry (naming it) and
    ``KeyError`` for an unknown gate name or code.
    """
    if isinstance(gates, torch.Tensor):
        if gates.dim() != 2 or gates.shape[0] != gates.shape[1]:
            raise ValueError(f"gate matrix must be square (M+1, M+1), got shape {tuple(gates.shape)}")
        if gates.dtype.is_floating_point or gates.dtype.is_complex or gates.dtype == torch.bool:
            raise ValueError(f"a gate-code tensor must have an integer dtype, got {gates.dtype}: "
                             "codes are 0 cutoff, 1 through, 2 linear, 3 correct")
        codes = gates.detach().to("cpu", torch.int64)
        for c in set(codes.flatten().tolist()):  # a handful of entries: cheaper than unique()
            if c not in _BY_CODE:
                s, t = (codes == c).nonzero()[0].tolist()
                _code_of(c, s, t)  # raises, naming the entry
        return codes
    rows = [list(r) for r in gates]
    n = len(rows)
    if n == 0 or any(len(r) != n for r in rows):
        raise ValueError(f"gate matrix must be square (M+1, M+1), got {n} row{'s' if n != 1 else ''} of lengths "
                         f"{[len(r) for r in rows]}")
    return torch.tensor([[_code_of(g, s, t) for t, g in enumerate(r)] for s, r in enumerate(rows)],
                        dtype=torch.int64)
