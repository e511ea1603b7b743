"""Training-step paths and the one factory that picks among them.

Follow a batch: :class:`~.eager.EagerStep` is the plain reference (each node's
forward, :class:`~ktg_fast.loss.GraphLoss`, one backward, ``torch.optim.SGD``);
:class:`~.fused.FusedStep` runs each :class:`~.node_group.NodeGroup` of
same-architecture nodes as one vmapped forward and updates it with
:class:`~.flat_sgd.FlatSGD`; :class:`~.cuda_graph.CudaGraphStep` captures the
fused step as one CUDA graph.  All keep the :class:`~.base.TrainStep`
interface and per-node checkpoints, so a run resumes on any path.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

from ..graph import Graph
from ..recipe import TrainConfig
from .base import TrainStep, eval_mode_logits, node_lrs, say_once
from .cuda_graph import CudaGraphStep
from .eager import EagerStep
from .flat_sgd import FlatSGD
from .fused import FusedStep
from .node_group import NodeGroup, architecture_key, group_nodes

__all__ = ["STEP_KINDS", "STEPS", "CPU_AUTO_KIND", "make_step", "TrainStep", "EagerStep", "FusedStep",
           "CudaGraphStep", "NodeGroup", "FlatSGD", "architecture_key", "group_nodes", "eval_mode_logits",
           "node_lrs"]

# The registry: every step path by the name --step takes.
STEPS: dict[str, Callable[..., TrainStep]] = {"eager": EagerStep, "fused": FusedStep, "cudagraph": CudaGraphStep}
STEP_KINDS = ("auto", *STEPS)

# On the CPU "auto" takes the eager step.  bench/test_bench_step.py (batch 16,
# 32x32; 3 x resnet8, and resnet8/wrn10_1/resnet8/resnet14) put the fused step
# at 0.75-1.1x the eager one over several runs on 1 and 2 shared cores: a CPU
# step is arithmetic-bound, not launch-bound, and oneDNN runs vmap's grouped
# convolutions no faster than separate ones, so fusing buys nothing there.
CPU_AUTO_KIND = "eager"


def _nets_device(nets: Sequence[nn.Module]) -> torch.device:
    devices = {p.device for net in nets for p in net.parameters()}
    return next(iter(devices)) if len(devices) == 1 else torch.device("cpu")


def make_step(kind: str, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *,
              loss_impl: str = "auto") -> TrainStep:
    """Build the step path named ``kind``; ``auto`` picks the fastest that works where the nets are.

    ``auto`` is the CUDA-graph step on CUDA (it falls back to the fused step if
    capture fails) and :data:`CPU_AUTO_KIND` elsewhere; ``cudagraph`` with nets
    off CUDA falls back to the fused step with one warning.

    Raises:
        ValueError: an unknown ``kind`` (the message lists :data:`STEP_KINDS`).
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step {kind!r}; choose from {', '.join(STEP_KINDS)}")
    nets = list(nets)
    device = _nets_device(nets)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if kind == "auto":
        if on_cuda:
            kind, why = "cudagraph", "CUDA: fused groups, streams, whole-step CUDA graph"
        else:
            kind, why = CPU_AUTO_KIND, f"{device.type}: no CUDA graphs; {CPU_AUTO_KIND} is fastest here"
        say_once(logging.INFO, "step auto -> %s (%s)", kind, why)
    if kind == "cudagraph" and not on_cuda:
        say_once(logging.WARNING, "step 'cudagraph' needs CUDA (the nets are on %s); using the fused step",
                 device.type)
        kind = "fused"
    return STEPS[kind](graph, nets, cfg, loss_impl=loss_impl)
