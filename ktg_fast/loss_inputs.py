"""The graph loss's front door: what a call must hand over, checked once, with errors that name it.

Shapes and dtypes of logits and labels, the temperature, the linear gate's progress (one value, or one
per destination node), the gate matrix's size and structure (the structure rule itself lives in
:mod:`ktg_fast.graph`).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence, Union

import torch

from . import gates as _gates
from .graph import Graph, check_gate_structure

__all__ = ["GraphLossResult", "LogitsLike", "GatesLike", "stack_logits", "flatten_batch", "check_labels",
           "check_label_kind", "check_temperature", "prepare_gates", "progress_tensor", "gates_and_temperature"]

LogitsLike = Union[torch.Tensor, Sequence[torch.Tensor]]
GatesLike = Union[torch.Tensor, Sequence[Sequence[Union[str, int]]], Graph]


def gates_and_temperature(gates: GatesLike, temperature: float | None) -> tuple[GatesLike, float]:
    """A :class:`~ktg_fast.graph.Graph`'s gate matrix and temperature (a ``temperature`` given wins), or
    ``gates`` as they are with ``temperature`` (None: 1.0)."""
    if isinstance(gates, Graph):
        return gates.gates, gates.temperature if temperature is None else temperature
    return gates, 1.0 if temperature is None else temperature


class GraphLossResult(NamedTuple):
    """Losses of one batch.

    Attributes:
        node_loss: (M,) loss L_t of each network node t = 1..M (index t-1).
            Its gradient reaches node t's logits only, so
            ``node_loss.sum().backward()`` trains every node by its own loss.
        edge_loss: (M+1, M+1) loss L_{s,t} of every edge [source][destination];
            zero for cutoff edges, the diagonal and column 0.
    """

    node_loss: torch.Tensor
    edge_loss: torch.Tensor


def stack_logits(logits: LogitsLike) -> torch.Tensor:
    """(M, *, C) logits, or a list of M (*, C) tensors of one shape, as one (M, *, C) tensor.

    Every node's logits need a row dimension: a (C,) row is refused (with the fix, ``unsqueeze``),
    never guessed, since a stacked (M, C) tensor could as well be one node's (B, C).

    Raises:
        ValueError: no row dimension, an empty list, or nodes of different shapes (each named).
        TypeError: something other than tensors, or logits that are not floating point.
    """
    if isinstance(logits, torch.Tensor):
        if logits.dim() < 3:
            hint = (": it has no row dimension. For one row per node pass logits.unsqueeze(1), (M, 1, C), with "
                    "labels of shape (1,); one node's (B, C) logits are logits.unsqueeze(0), (1, B, C)"
                    if logits.dim() == 2 else "")
            raise ValueError(f"logits must be (M, *, C) (e.g. (M, B, C) or (M, B, T, C)) or a list of M (*, C) "
                             f"tensors, got shape {tuple(logits.shape)}{hint}")
        z = logits
    else:
        logits = list(logits)
        if not logits:
            raise ValueError("logits is an empty list: pass one (B, C) tensor per network node")
        if not all(isinstance(x, torch.Tensor) for x in logits):
            raise TypeError("logits must be tensors: an (M, B, C) tensor or a list of M (B, C) tensors")
        for i, x in enumerate(logits):
            if x.dim() < 2:
                raise ValueError(f"logits[{i}] is {tuple(x.shape)}: each node's logits need a row dimension, "
                                 "(B, C) or (*, C); for one row pass [z.unsqueeze(0) for z in logits], (1, C) "
                                 "each, with labels of shape (1,)")
        for i, x in enumerate(logits[1:], start=1):
            if x.shape != logits[0].shape:
                raise ValueError(f"every node's logits must be of one shape (*, C), e.g. (B, C): logits[0] is "
                                 f"{tuple(logits[0].shape)} but logits[{i}] is {tuple(x.shape)}")
        z = torch.stack(logits)
    if not z.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point (float32, float64, bfloat16 or float16), got {z.dtype}")
    return z


_LABEL_DTYPES = (torch.int64, torch.int32)


def check_label_kind(labels: torch.Tensor, device: torch.device, against: str = "logits",
                     against_is: str = "are") -> None:
    """``labels`` is an int64 or int32 tensor on ``device``, the device of ``against`` (the logits, or
    ``hidden[0]`` for :class:`~ktg_fast.linear_loss.GraphLinearLoss`, with ``against_is="is"``), checked
    before any of its values is read.

    Raises:
        TypeError: not a tensor.
        ValueError: another dtype, or another device (both named, with the fix): labels are never moved
            between devices behind the caller's back (a copy, or a synchronisation, every step).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 or int32 tensor of class indices, got {type(labels).__name__}")
    if labels.dtype not in _LABEL_DTYPES:
        raise ValueError(f"labels must be int64 or int32 class indices, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {against} {against_is} on {device}: move the labels "
                         f"there, labels.to({against}.device)")


def flatten_batch(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, *, C) logits and (*) labels -> (M, B, C) and (B,), as F.cross_entropy users expect."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 or int32 tensor of class indices, got {type(labels).__name__}")
    lead = tuple(z.shape[1:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must be {lead} to match logits {tuple(z.shape)} (M, *, C), got {tuple(labels.shape)}")
    if z.dim() == 3:
        return z, labels
    return z.reshape(z.shape[0], -1, z.shape[-1]), labels.reshape(-1)


def check_labels(labels: torch.Tensor, z: torch.Tensor, ignore_index: int) -> None:
    """Shape, dtype, device (the logits') and (on the CPU, where it costs no synchronisation) range of the
    labels."""
    m, b, c = z.shape
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a ({b},) int64 or int32 tensor of class indices, got {type(labels).__name__}")
    if labels.shape != (b,):
        raise ValueError(f"labels must be ({b},) to match logits {tuple(z.shape)}, got {tuple(labels.shape)}")
    check_label_kind(labels, z.device)
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= c))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must lie in [0, {c}) or equal ignore_index={ignore_index}; "
                             f"labels[{i}] is {int(labels[i])}")


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor):
        raise TypeError(f"temperature must be a Python number (a constant of the graph), not a tensor; got "
                        f"{temperature!r}: pass float(temperature)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive finite number, got {temperature!r}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def prepare_gates(gates: GatesLike, num_nodes: int) -> torch.Tensor:
    """Validate a gate matrix for ``num_nodes`` network nodes; return int64 codes on the CPU.

    Raises ``ValueError`` naming the edge at fault for a wrong size or a
    non-cutoff gate on the diagonal or into the label (column 0).
    """
    codes = _gates.gate_codes(gates)
    if codes.shape[0] != num_nodes + 1:
        raise ValueError(
            f"gate matrix is {codes.shape[0]}x{codes.shape[0]} but logits hold {num_nodes} nodes: "
            f"it must be {num_nodes + 1}x{num_nodes + 1} (label node 0 plus one row per network)"
        )
    _check_structure(tuple(map(tuple, codes.tolist())))
    return codes


@functools.lru_cache(maxsize=256)
def _check_structure(key: tuple[tuple[int, ...], ...]) -> None:
    """check_gate_structure once per distinct matrix (a failure raises and is not cached)."""
    check_gate_structure(torch.tensor(key, dtype=torch.int64))


def progress_tensor(
    progress: Union[float, torch.Tensor], num_nodes: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """progress on ``device``: a 0-dim tensor (one k / k_end for every linear edge) or an (M,) one.

    An (M,) tensor gives each destination network node its own progress: edges s -> t read
    ``progress[t-1]`` (trials packed into one graph, each at its own step).  A one-element tensor of any
    shape is the 0-dim form.  Values outside [0, 1] (or NaN) are refused where it costs no sync: a float
    always, a CPU tensor too, a CUDA tensor not (it would synchronise every step).
    """
    if isinstance(progress, torch.Tensor):
        if not progress.dtype.is_floating_point or not (progress.numel() == 1
                                                        or tuple(progress.shape) == (num_nodes,)):
            raise ValueError(f"progress must be a float, a 0-dim floating-point tensor or a ({num_nodes},) one "
                             f"(k / k_end per destination node 1..{num_nodes}), got {progress.dtype} of shape "
                             f"{tuple(progress.shape)}")
        if progress.numel() == 1:
            if progress.device.type == "cpu" and not torch.compiler.is_compiling():
                _check_progress_value(float(progress))
            return progress.reshape(()).to(device=device, dtype=dtype)
        if progress.device.type == "cpu" and not torch.compiler.is_compiling():
            bad = ~((progress >= 0) & (progress <= 1))  # NaN too
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"progress[{i}] (k / k_end of the linear gates into node {i + 1}) must lie in "
                                 f"[0, 1], got {float(progress[i])!r}")
        return progress.to(device=device, dtype=dtype)
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise TypeError(f"progress must be a number in [0, 1], a 0-dim tensor or a ({num_nodes},) tensor, "
                        f"got {progress!r}")
    _check_progress_value(float(progress))
    return torch.tensor(float(progress), device=device, dtype=dtype)


def _check_progress_value(v: float) -> None:
    if not 0.0 <= v <= 1.0:  # also false for NaN
        raise ValueError(f"progress (k / k_end of the linear gate) must lie in [0, 1], got {v!r}")
