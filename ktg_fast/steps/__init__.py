"""Training-step paths and the one factory that picks among them.

Follow a batch: :class:`~.eager.EagerStep` is the plain reference (each node's
forward, :class:`~ktg_fast.loss.GraphLoss`, one backward, ``torch.optim.SGD``);
:class:`~.fused.FusedStep` runs each :class:`~.node_group.NodeGroup` of
same-architecture nodes as one vmapped forward and updates it with
:class:`~.flat_sgd.FlatSGD`; :class:`~.cuda_graph.CudaGraphStep` captures the
fused step as one CUDA graph; :class:`~.compiled.CompiledStep` is the fused
step under ``torch.compile`` (and, on CUDA, the body the CUDA-graph step
captures when it compiles).  ``precision`` (:mod:`.precision`) runs any of
them in fp32, bf16 or fp16.  All keep the :class:`~.base.TrainStep`
interface and per-node checkpoints, so a run resumes on any path.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..graph import Graph
from ..loss import GraphLoss
from ..recipe import TrainConfig
from .base import TrainStep, eval_mode_logits, node_lrs, say_once
from .compiled import CompiledCudaGraphStep, CompiledStep, compile_cache_dir, graph_breaks
from .cuda_graph import CudaGraphStep
from .eager import EagerStep
from .flat_sgd import FlatSGD
from .fused import FusedStep
from .node_group import NodeGroup, architecture_key, group_nodes
from .precision import PRECISIONS, NodeLossScale, check_precision, default_precision, precision_warning

__all__ = ["STEP_KINDS", "DEPRECATED_STEP_KINDS", "STEPS", "CPU_AUTO_KIND", "make_step", "TrainStep", "EagerStep", "FusedStep",
           "CudaGraphStep", "NodeGroup", "FlatSGD", "architecture_key", "group_nodes", "eval_mode_logits",
           "node_lrs", "CompiledStep", "CompiledCudaGraphStep", "compile_cache_dir", "graph_breaks", "PRECISIONS",
           "NodeLossScale", "default_precision", "precision_warning", "CPU_COMPILE_MIN_STEPS", "CUDA_COMPILE_MIN_STEPS"]

# The registry: every step path by the name --step takes.
STEPS: dict[str, Callable[..., TrainStep]] = {"eager": EagerStep, "fused": FusedStep, "cudagraph": CudaGraphStep,
                                              "compiled": CompiledStep}
STEP_KINDS = ("auto", *STEPS)
# Old spellings still accepted for one release, with a deprecation message ("graph" meant two things).
DEPRECATED_STEP_KINDS = {"graph": "cudagraph"}

# On the CPU "auto" takes the eager step.  bench/test_bench_step.py (batch 16,
# 32x32; 3 x resnet8, and resnet8/wrn10_1/resnet8/resnet14) put the fused step
# at 0.75-1.1x the eager one over several runs on 1 and 2 shared cores: a CPU
# step is arithmetic-bound, not launch-bound, and oneDNN runs vmap's grouped
# convolutions no faster than separate ones, so fusing buys nothing there.
CPU_AUTO_KIND = "eager"

# The compiled step on the CPU (2 cores, resnet8/wrn10_1/resnet8 + a frozen resnet8, batch 16) ran a step
# 1.45x faster than the eager one in fp32 (55 vs 80 ms) but its first compiled step took 46 s with a cold
# Inductor cache (6 s warm): ~15 s per network node.  At a saving of >= 10 ms per step (the smallest nets),
# compiling pays back after ~1,500 steps per node set; "auto" asks for 3x that before choosing it.
CPU_COMPILE_MIN_STEPS = 5000
# On CUDA the CUDA-graph step captures the compiled body unless the run is known to be shorter than this
# (a guess until a GPU measurement: compile times of a minute or two against steps of a few ms).
CUDA_COMPILE_MIN_STEPS = 2000
_COLD_COMPILE_S_PER_NODE = 15.0


def _nets_device(nets: Sequence[nn.Module]) -> torch.device:
    devices = {p.device for net in nets for p in net.parameters()}
    return next(iter(devices)) if len(devices) == 1 else torch.device("cpu")


def make_step(kind: str, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *,
              loss_impl: str = "auto", total_steps: Optional[int] = None, precision: str = "fp32",
              channels_last: bool = False, compile_cache: Optional[Union[str, os.PathLike]] = None,
              compile: Optional[bool] = None, loss: Optional[GraphLoss] = None) -> TrainStep:
    """Build the step path named ``kind``; ``auto`` picks the fastest that works where the nets are.

    ``auto`` is the CUDA-graph step on CUDA (it falls back to the fused step if
    capture fails); elsewhere :data:`CPU_AUTO_KIND`, or the compiled step when
    ``total_steps`` is known and at least :data:`CPU_COMPILE_MIN_STEPS` (the
    compile time is then paid back; the log says what was picked and why).
    ``cudagraph`` with nets off CUDA falls back to the fused step with one
    warning; on CUDA it captures the compiled step's body
    (:class:`~.compiled.CompiledCudaGraphStep`) when ``compile`` is True, or
    when it is None and ``total_steps`` is known and at least
    :data:`CUDA_COMPILE_MIN_STEPS`; otherwise it captures the fused step.

    Args:
        kind: one of :data:`STEP_KINDS`.
        graph, nets, cfg: the graph, one net per node (on one device), the recipe.
        loss_impl: the graph loss implementation (:class:`~ktg_fast.loss.GraphLoss`).
        total_steps: the run's optimizer steps, if known (weighs compile time against them).
        precision: "fp32", "bf16" or "fp16" (:mod:`.precision`).
        channels_last: channels-last input (and nets, for the eager step).
        compile_cache: Inductor's on-disk cache folder (:func:`~.compiled.compile_cache_dir`); used when a
            compiled step is built.
        compile: force (True) or forbid (False) compiling for ``cudagraph`` on CUDA (False also keeps ``auto``
            from picking the compiled step on the CPU); None decides.
        loss: a bound :class:`~ktg_fast.loss.GraphLoss` for the step to use (a trial pack's, whose gates
            are set in place); None binds one to ``graph``'s gates.

    Raises:
        ValueError: an unknown ``kind`` (the message lists :data:`STEP_KINDS`) or precision.
    """
    if kind in DEPRECATED_STEP_KINDS:
        new = DEPRECATED_STEP_KINDS[kind]
        warnings.warn(f"--step {kind} is now --step {new} (the old name goes in the next release)",
                      FutureWarning, stacklevel=2)
        kind = new
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step {kind!r}; choose from {', '.join(STEP_KINDS)}")
    check_precision(precision)
    nets = list(nets)
    device = _nets_device(nets)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if kind == "auto":
        if on_cuda:
            kind, why = "cudagraph", "CUDA: fused groups, streams, whole-step CUDA graph"
        elif total_steps is not None and total_steps >= CPU_COMPILE_MIN_STEPS and compile is not False:
            est = _COLD_COMPILE_S_PER_NODE * len(nets)
            kind, why = "compiled", (f"{device.type}: {total_steps} steps; compiling costs about {est:.0f} s "
                                     f"with a cold cache, repaid after about {CPU_COMPILE_MIN_STEPS // 3} steps")
        else:
            steps = "unknown" if total_steps is None else f"only {total_steps}"
            kind, why = CPU_AUTO_KIND, (f"{device.type}: no CUDA graphs; {CPU_AUTO_KIND} is fastest here "
                                        f"({steps} steps: too few to repay compiling)")
        say_once(logging.INFO, "step auto -> %s (%s)", kind, why)
    if kind == "cudagraph" and not on_cuda:
        say_once(logging.WARNING, "step 'cudagraph' needs CUDA (the nets are on %s); using the fused step",
                 device.type)
        kind = "fused"
    opts: dict = dict(loss_impl=loss_impl, precision=precision, channels_last=channels_last, loss=loss)
    if kind == "cudagraph":
        if compile is None:  # only where the run is known to be long enough to repay compiling
            compile = total_steps is not None and total_steps >= CUDA_COMPILE_MIN_STEPS
        if compile:
            return CompiledCudaGraphStep(graph, nets, cfg, cache_dir=compile_cache, **opts)
    if kind == "compiled":
        return CompiledStep(graph, nets, cfg, cache_dir=compile_cache, **opts)
    return STEPS[kind](graph, nets, cfg, **opts)
