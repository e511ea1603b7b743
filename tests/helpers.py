"""Helpers shared by several test modules (imported as ``from helpers import ...``, like ``brute_force``)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ktg_fast.data import DataSpec
from ktg_fast.graph import Graph, Node
from ktg_fast.models import get_model, register_model, unregister_model
from ktg_fast.recipe import TrainConfig

# Every gate kind between two students of one architecture (nodes 1, 3), one of another (node 2) and a
# frozen teacher (node 4): the groups come out of node order.
MIXED_GATES = [["cutoff", "through", "linear", "through", "cutoff"],
               ["cutoff", "cutoff", "through", "correct", "cutoff"],
               ["cutoff", "linear", "cutoff", "through", "cutoff"],
               ["cutoff", "through", "correct", "cutoff", "cutoff"],
               ["cutoff", "through", "through", "linear", "cutoff"]]


def mixed_graph(student: str, other: str, teacher: str) -> Graph:
    """Nodes ``student``, ``other``, ``student`` and a frozen ``teacher`` (node 4), with :data:`MIXED_GATES`."""
    return Graph([Node(student), Node(other), Node(student), Node(teacher, checkpoint="teacher.pt")],
                 MIXED_GATES, temperature=2.0)


def build_nets(graph: Graph, dtype: Optional[torch.dtype] = None, seed: int = 0,
               num_classes: int = 10) -> list[nn.Module]:
    """One freshly initialised net per node (seeded), in ``dtype`` if given; frozen nodes become
    "pre-trained" teachers: non-trivial BatchNorm running statistics, eval mode, no grad."""
    torch.manual_seed(seed)
    nets = [get_model(n.model, num_classes=num_classes) for n in graph.nodes]
    if dtype is not None:
        nets = [net.to(dtype) for net in nets]
    for t in graph.frozen:
        for bn in (m for m in nets[t - 1].modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
        nets[t - 1].eval().requires_grad_(False)
    return nets


def small_config(**kw) -> TrainConfig:
    """A quick recipe: batch 32, lr 0.05, seed 0 (``kw`` overrides or adds fields)."""
    return TrainConfig(**{"batch_size": 32, "lr": 0.05, "seed": 0, **kw})


def synthetic_data(**kw) -> DataSpec:
    """The synthetic dataset through the torch loader (``kw`` overrides or adds fields)."""
    return DataSpec(**{"dataset": "synthetic", "loader": "torch", **kw})


class _Exploding(nn.Module):
    """A resnet8 whose training outputs turn NaN from the ``from_call``-th training forward of any instance."""

    calls = 0
    from_call = 1

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.net = get_model("resnet8", num_classes=num_classes, in_channels=in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            type(self).calls += 1
            if type(self).calls >= self.from_call:
                out = out * float("nan")
        return out


@contextlib.contextmanager
def exploding_model(from_call: int = 1) -> Iterator[None]:
    """Register model ``exploding`` (a resnet8 whose training outputs are NaN from its ``from_call``-th
    training forward on, counted over every instance) for the ``with`` block."""
    cls = type("Exploding", (_Exploding,), {"calls": 0, "from_call": from_call})
    register_model("exploding")(lambda *, num_classes, in_channels=3: cls(num_classes, in_channels))
    try:
        yield
    finally:
        unregister_model("exploding")
